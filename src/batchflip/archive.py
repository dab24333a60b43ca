"""Reviewer reproduction: pack, restore and verify generations.

``batchflip archive pack --config C --out A.tar.gz`` packs, for every study of config ``C``,
each generation file with its ``.stack.json`` fingerprint, the reruns of kernel-ablation
studies (+ fingerprints), the battery parquet of each study (the members and their paths:
``batchflip.layout.archive_members``), and the config itself (as ``config.yaml``) into one
tar.gz.
Members keep their workspace-relative paths, are sorted by name and carry no time stamps
or owners, and gzip records no time either: the same files always give the same archive
bytes. The first member, ``MANIFEST.sha256``, lists every
other member's sha256 in ``sha256sum`` format (``tar -xzf A.tar.gz && sha256sum -c
MANIFEST.sha256`` checks an unpacked archive without batchflip).

A config with ``restore: {archive: A.tar.gz}`` makes the workflow restore generation,
ablation-rerun and battery files from the archive instead of running the models
(workflow/rules/restore.smk); every restored member is checked against the manifest and a
mismatch stops the job. So ``snakemake --cores all results/paper`` rebuilds every number
with no GPU.
``batchflip archive config A.tar.gz --out reviewer.yaml`` writes that config: the archived
one plus the restore key.

``verify`` compares a reviewer's fresh generations (made without ``restore``) with the
archive, per generation file, target rows only (fillers are excluded downstream too):

- where the stack fingerprints match (same ``stack_id`` on both sides), greedy decoding is
  deterministic, so every row must match exactly: same rows (keyed by prompt id, group and
  position), same ``text``, same ``token_ids``; each difference is listed with its row key;
- where they differ, exact equality is not expected; both sides are scored with the
  configured scorer versions and paired against the baseline (batchflip.flips), and per
  (model, condition, domain) the reviewer's flip rate must lie inside the Wilson interval
  (at ``confidence``, default 0.95) of the archived rate.

The report (``results/verify/{study}.json``) gives each file's mode and result, each rate
comparison, the mismatching rows and an overall ``pass``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from batchflip.errors import BatchflipError, InputError
from batchflip.io import atomic_path, read_parquet, sha256_file, write_json, write_text
from batchflip.layout import archive_members

MANIFEST = "MANIFEST.sha256"
CONFIG = "config.yaml"
KEY = ["prompt_id", "group_id", "position"]
MAX_LISTED = 1000
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


# --- pack ---------------------------------------------------------------------------------


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack(members: dict[str, Path], out: str | os.PathLike[str]) -> dict[str, str]:
    """Write a deterministic tar.gz of ``members`` (name → file) with MANIFEST.sha256 first;
    return name → sha256."""
    for name, path in members.items():
        if not Path(path).is_file():
            raise InputError(path, f"missing file for archive member {name} (run its job "
                             "first, or pack fewer studies with --study)")
    sums = {name: sha256_file(members[name]) for name in sorted(members)}
    manifest = "".join(f"{h}  {n}\n" for n, h in sums.items()).encode()
    with atomic_path(out) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_tarinfo(MANIFEST, len(manifest)), io.BytesIO(manifest))
        for name in sums:
            with open(members[name], "rb") as fh:
                tar.addfile(_tarinfo(name, os.fstat(fh.fileno()).st_size), fh)
    return sums


def pack_config(config_file: str | Path, out: str | Path, root: str | Path = ".",
                studies: Iterable[str] | None = None) -> dict[str, str]:
    """Pack everything a config's results rest on (paths relative to ``root``)."""
    cfg = yaml.safe_load(Path(config_file).read_text())
    if not isinstance(cfg, dict) or "studies" not in cfg:
        raise InputError(config_file, "not a batchflip config", field="studies")
    members = {m: Path(root) / m for m in archive_members(cfg, studies)}
    members |= {m: Path(root) / m for m in human_inputs(root, studies or cfg["studies"])}
    members[CONFIG] = Path(config_file)
    return pack(members, out)


HUMAN_INPUTS = "resources/adjudication"


def human_inputs(root: str | Path, studies: Iterable[str]) -> list[str]:
    """The hand-made files the numbers rest on, present under ``root``: each study's filled
    rater sheets and pinned key (``resources/adjudication/{study}/*.csv``, ``key.parquet``)."""
    out = []
    for study in studies:
        folder = Path(root) / HUMAN_INPUTS / study
        for f in sorted(folder.glob("*.csv")) + sorted(folder.glob("key.parquet")):
            out.append(f.relative_to(root).as_posix())
    return out


def restore_human_inputs(archive: str | Path, root: str | Path) -> list[str]:
    """Unpack the archive's rater sheets and pinned keys into workspace ``root``."""
    names = [n for n in read_manifest(archive) if n.startswith(HUMAN_INPUTS + "/")]
    extract(archive, {n: Path(root) / n for n in names})
    return names


# --- read and restore ---------------------------------------------------------------------


def _open(archive: str | Path) -> tarfile.TarFile:
    if not Path(archive).is_file():
        raise InputError(archive, "archive does not exist")
    try:
        return tarfile.open(archive, mode="r:gz")
    except _READ_ERRORS as exc:
        raise InputError(archive, f"not a readable tar.gz archive ({exc})") from None


def read_manifest(archive: str | Path) -> dict[str, str]:
    """Member name → sha256 from the archive's MANIFEST.sha256."""
    with _open(archive) as tar:
        try:
            fh = tar.extractfile(MANIFEST)
            text = fh.read().decode() if fh else ""
        except KeyError:
            raise InputError(archive, f"no {MANIFEST} member: not a batchflip archive") from None
        except _READ_ERRORS as exc:
            raise InputError(archive, f"unreadable ({exc})", field=MANIFEST) from None
    sums: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise InputError(archive, f"malformed manifest line {line!r}", row=i,
                             field=MANIFEST)
        sums[name] = digest
    return sums


def _check_regular(archive: str | Path, info: tarfile.TarInfo) -> None:
    """A batchflip archive holds regular files only (pack writes nothing else): a link,
    device or folder member is refused before anything is read or written."""
    if not info.isfile():
        kind = ("a symbolic link" if info.issym() else "a hard link" if info.islnk()
                else "a folder" if info.isdir() else "not a regular file")
        target = f" to {info.linkname}" if info.issym() or info.islnk() else ""
        raise BatchflipError(f"{archive}: member {info.name} is {kind}{target}; a batchflip "
                             "archive holds only regular files (it was altered): fetch it "
                             "again, or ask for a repacked one")


def extract(archive: str | Path, wanted: dict[str, Path]) -> None:
    """Write members (name → destination), each checked against the manifest first."""
    sums = read_manifest(archive)
    for name in wanted:
        if name not in sums:
            raise BatchflipError(f"{archive}: no member {name} (the archive was packed from a "
                                 "config without it; pack the study, or restore a config "
                                 "that matches the archive)")
    done: set[str] = set()
    with _open(archive) as tar:
        try:
            for info in tar:
                if info.name not in wanted:
                    continue
                _check_regular(archive, info)
                fh = tar.extractfile(info)
                if fh is None:
                    raise BatchflipError(f"{archive}: member {info.name} is not a file")
                with atomic_path(wanted[info.name]) as tmp, open(tmp, "wb") as out:
                    h = hashlib.sha256()
                    while block := fh.read(1 << 20):
                        h.update(block)
                        out.write(block)
                    if h.hexdigest() != sums[info.name]:
                        raise BatchflipError(
                            f"{archive}: member {info.name} fails its checksum (sha256 "
                            f"{h.hexdigest()}, {MANIFEST} says {sums[info.name]}): the "
                            "archive is corrupt or was altered; fetch it again")
                done.add(info.name)
        except _READ_ERRORS as exc:
            raise InputError(archive, f"corrupt archive ({exc})") from None
    if missing := sorted(set(wanted) - done):
        raise BatchflipError(f"{archive}: {MANIFEST} lists {missing[0]} but the archive has "
                             "no such member")


def read_member(archive: str | Path, name: str) -> bytes:
    """One member's bytes, checked against the manifest."""
    sums = read_manifest(archive)
    if name not in sums:
        raise BatchflipError(f"{archive}: no member {name}")
    with _open(archive) as tar:
        try:
            info = tar.getmember(name)
            _check_regular(archive, info)
            fh = tar.extractfile(info)
            data = fh.read() if fh else b""
        except KeyError:
            raise BatchflipError(f"{archive}: {MANIFEST} lists {name} but the archive has no "
                                 "such member") from None
        except _READ_ERRORS as exc:
            raise InputError(archive, f"corrupt archive ({exc})") from None
    if hashlib.sha256(data).hexdigest() != sums[name]:
        raise BatchflipError(f"{archive}: member {name} fails its checksum ({MANIFEST} says "
                             f"{sums[name]}): the archive is corrupt or was altered")
    return data


def check(archive: str | Path) -> int:
    """Check every member against the manifest (a scratch extraction); return the count."""
    import tempfile

    sums = read_manifest(archive)
    with tempfile.TemporaryDirectory() as d:
        extract(archive, {n: Path(d) / f"m{i}" for i, n in enumerate(sorted(sums))})
    return len(sums)


def reviewer_config(archive: str | Path) -> str:
    """The archived config with ``restore: {archive: ...}`` set (and no ``verify``)."""
    cfg = yaml.safe_load(read_member(archive, CONFIG).decode())
    cfg.pop("verify", None)
    cfg["restore"] = {"archive": str(archive)}
    return ("# The archived config, restoring generations from the archive (batchflip "
            "archive config).\n" + yaml.safe_dump(cfg, sort_keys=False))


# --- verify -------------------------------------------------------------------------------


def _targets(df: Any) -> Any:
    t = df[df["role"] == "target"]
    dup = t.duplicated(KEY)
    if dup.any():
        raise BatchflipError(f"target row {t.loc[dup, KEY].iloc[0].to_dict()} appears twice")
    return t


def _stack(df: Any) -> str | None:
    ids = sorted(set(df["stack_id"].astype(str)))
    return ids[0] if len(ids) == 1 else None


def compare_exact(archived: Any, fresh: Any) -> list[dict[str, Any]]:
    """Row-key mismatches between two target frames of one (model, condition)."""
    import numpy as np

    a, f = _targets(archived), _targets(fresh)
    m = a.merge(f, on=KEY, how="outer", suffixes=("_a", "_f"), indicator="side")
    out: list[dict[str, Any]] = []
    for row in m.itertuples(index=False):
        key = {k: (getattr(row, k).item() if hasattr(getattr(row, k), "item")
                   else getattr(row, k)) for k in KEY}
        if row.side != "both":
            out.append({**key, "field": "row", "problem": "only in the archive"
                        if row.side == "left_only" else "only in the fresh run"})
            continue
        if row.text_a != row.text_f:
            out.append({**key, "field": "text", "archive": row.text_a, "fresh": row.text_f})
        elif not np.array_equal(np.asarray(row.token_ids_a), np.asarray(row.token_ids_f)):
            out.append({**key, "field": "token_ids", "problem": "token ids differ"})
    return out


def flip_counts(gens: list[Any], battery: Any, versions: dict[str, int], baseline: str,
                dispatch_baselines: dict[str, str] | None) -> dict[tuple[str, str, str],
                                                                   tuple[int, int]]:
    """(model, condition, domain) → (flips, paired prompts) of one side. A model pairs a
    dispatch with its own baseline only where it runs that baseline condition (a scope
    may leave a dispatch out, as the flips rule does: layout.dispatch_baselines)."""
    import pandas as pd

    from batchflip.flips import pair_flips
    from batchflip.scoring import score_frame

    scored = pd.concat([score_frame(g, battery, versions) for g in gens], ignore_index=True)
    out: dict[tuple[str, str, str], tuple[int, int]] = {}
    for model, part in scored.groupby("model"):
        runs = set(part["condition"])
        own = {d: c for d, c in (dispatch_baselines or {}).items() if c in runs}
        flips = pair_flips(part, baseline, own)
        for (cond, dom), grp in flips.groupby(["condition", "domain"]):
            out[(str(model), str(cond), str(dom))] = (int(grp["flip"].sum()), len(grp))
    return out


STACK_EXPECTATIONS = {
    "same": "same stack fingerprint: every target row's text and token ids identical to the "
            "archive (timings aside), else fail",
    "other": "another stack: per file the share of rows with identical text and with the same "
             "label, each with its Wilson interval, and each flip rate against the archived "
             "rate's interval; reported for judgement, never a pass by default",
}


def agreement(archived: Any, fresh: Any, bat_a: Any, bat_f: Any, versions: dict[str, int],
              confidence: float) -> dict[str, Any]:
    """Row agreement of two target frames of one (model, condition) made on different
    stacks: the share of rows with byte-identical text and the share with the same score
    (within the flips stage's tolerance), each with its Wilson interval."""
    from batchflip.flips import FLIP_TOL
    from batchflip.scoring import score_frame
    from batchflip.stats import wilson_interval

    a = score_frame(_targets(archived), bat_a, versions)
    f = score_frame(_targets(fresh), bat_f, versions)
    m = a.merge(f, on=KEY, how="inner", suffixes=("_a", "_f"))
    out: dict[str, Any] = {"rows": len(m), "unpaired": len(a) + len(f) - 2 * len(m)}
    same = {"text_identical": (m["text_a"] == m["text_f"]),
            "label_agreement": ((m["score_a"] - m["score_f"]).abs() <= FLIP_TOL)}
    for name, hits in same.items():
        k, n = int(hits.sum()), len(m)
        ci = wilson_interval(k, n, confidence) if n else None
        out[name] = {"k": k, "n": n, "rate": k / n if n else None,
                     "wilson": [ci.low, ci.high] if ci else None}
    return out


def verify(archive: str | Path, fresh_files: list[str | Path], battery: str | Path,
           versions: dict[str, int], baseline: str,
           dispatch_baselines: dict[str, str] | None = None, confidence: float = 0.95,
           root: str | Path = ".", study: str = "") -> dict[str, Any]:
    """Compare fresh generation files with their archived members (see module docstring).

    Member names are the files' paths relative to ``root``; the battery likewise."""
    import pandas as pd

    from batchflip.records import GENERATION_COLUMNS, require_columns
    from batchflip.stats import wilson_interval

    def member(p: str | Path) -> str:
        return Path(os.path.relpath(Path(p), root)).as_posix()

    files, mismatches, pairs = [], [], []
    for p in fresh_files:
        fresh = read_parquet(p)
        require_columns(fresh, GENERATION_COLUMNS, p)
        arch = pd.read_parquet(io.BytesIO(read_member(archive, member(p))))
        require_columns(arch, GENERATION_COLUMNS, f"{archive}:{member(p)}")
        sa, sf = _stack(arch), _stack(fresh)
        model, cond = str(fresh["model"].iloc[0]), str(fresh["condition"].iloc[0])
        entry = {"file": member(p), "model": model, "condition": cond,
                 "stack_id_archive": sa, "stack_id_fresh": sf,
                 "rows": int((fresh["role"] == "target").sum())}
        if sa is not None and sa == sf:
            bad = [{"model": model, "condition": cond, **x} for x in compare_exact(arch, fresh)]
            mismatches += bad
            entry.update(mode="exact", mismatches=len(bad), passed=not bad)
        else:
            entry.update(mode="rate")
        files.append(entry)
        pairs.append((arch, fresh))
    if any(e["mode"] == "rate" for e in files):
        bat_f = pd.read_parquet(battery)
        bat_a = pd.read_parquet(io.BytesIO(read_member(archive, member(battery))))
        for e, (arch, fresh) in zip(files, pairs, strict=True):
            if e["mode"] == "rate":
                e["agreement"] = agreement(arch, fresh, bat_a, bat_f, versions, confidence)
    rates: list[dict[str, Any]] = []
    rate_cells = {(e["model"], e["condition"]) for e in files if e["mode"] == "rate"}
    if rate_cells:
        bat_f = read_parquet(battery)
        bat_a = pd.read_parquet(io.BytesIO(read_member(archive, member(battery))))
        ka = flip_counts([a for a, _ in pairs], bat_a, versions, baseline, dispatch_baselines)
        kf = flip_counts([f for _, f in pairs], bat_f, versions, baseline, dispatch_baselines)
        for key in sorted(set(ka) | set(kf)):
            if key[:2] not in rate_cells:
                continue
            (fa, na), (ff, nf) = ka.get(key, (0, 0)), kf.get(key, (0, 0))
            if na == 0 or nf == 0:
                rates.append({"model": key[0], "condition": key[1], "domain": key[2],
                              "passed": False, "problem": "no paired rows on one side"})
                continue
            ci = wilson_interval(fa, na, confidence)
            ok = ci.low <= ff / nf <= ci.high
            rates.append({"model": key[0], "condition": key[1], "domain": key[2],
                          "archive": {"flips": fa, "n": na, "rate": fa / na,
                                      "wilson": [ci.low, ci.high]},
                          "fresh": {"flips": ff, "n": nf, "rate": ff / nf}, "passed": ok})
        for e in files:
            if e["mode"] == "rate":
                mine = [r for r in rates if (r["model"], r["condition"]) == (e["model"],
                                                                          e["condition"])]
                e["passed"] = all(r["passed"] for r in mine)
    exact_only = all(e["mode"] == "exact" for e in files)
    failed = not (all(e["passed"] is not False for e in files)
                  and all(r["passed"] for r in rates))
    return {
        "study": study, "archive": str(archive), "archive_sha256": sha256_file(archive),
        "confidence": confidence,
        "stack": "same" if exact_only else ("other" if all(e["mode"] == "rate" for e in files)
                                            else "mixed"),
        "expectation": STACK_EXPECTATIONS["same" if exact_only else "other"],
        "rule": "exact text and token ids where the stack ids match; otherwise the fresh flip "
                "rate inside the Wilson interval of the archived rate",
        # same stack: identical rows required (pass or fail); another stack: agreement is
        # reported and judged by a person, never a pass by default (a rate outside its
        # interval still fails)
        "passed": False if failed else (True if exact_only else None),
        "files": files, "rates": rates, "n_mismatches": len(mismatches),
        "mismatches": mismatches[:MAX_LISTED],
    }


# --- CLI ------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip archive {pack,restore,check,config,verify} ...``."""
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("pack", help="pack a config's generations, batteries and config")
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--root", default=".", help="workspace holding results/")
    p.add_argument("--study", action="append", help="pack only these studies")
    p.add_argument("--out", required=True)
    p = sub.add_parser("restore", help="restore workspace files from an archive")
    p.add_argument("archive")
    p.add_argument("paths", nargs="+", help="workspace paths (= member names) to restore")
    p = sub.add_parser("check", help="check every member against the manifest")
    p.add_argument("archive")
    p = sub.add_parser("config", help="write the archived config with restore set, and "
                       "unpack the rater sheets and pinned keys into the workspace")
    p.add_argument("archive")
    p.add_argument("--out", required=True)
    p.add_argument("--root", help="workspace for the rater sheets (default: --out's folder)")
    p = sub.add_parser("verify", help="compare fresh generations with the archive")
    p.add_argument("--archive", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--battery", required=True)
    p.add_argument("--versions", required=True, help="scorer versions as JSON")
    p.add_argument("--baseline", required=True)
    p.add_argument("--dispatch-baseline", action="append", default=[], metavar="D=COND")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--out", required=True)
    p.add_argument("fresh", nargs="+", help="fresh generation parquet files")


def main(args: argparse.Namespace) -> int:
    """Run one archive action."""
    import json

    if args.action == "pack":
        sums = pack_config(args.config, args.out, args.root, args.study)
        print(f"{args.out}: {len(sums)} members, sha256 {sha256_file(args.out)}")
    elif args.action == "restore":
        extract(args.archive, {Path(p).as_posix(): Path(p) for p in args.paths})
        print(f"restored {len(args.paths)} files from {args.archive}")
    elif args.action == "check":
        print(f"{args.archive}: all {check(args.archive)} members match {MANIFEST}")
    elif args.action == "config":
        write_text(reviewer_config(args.archive), args.out)
        human = restore_human_inputs(args.archive, args.root or Path(args.out).parent)
        print(f"{args.out}: config restoring from {args.archive}; {len(human)} rater "
              "sheets / pinned keys unpacked")
    else:
        own = dict(x.split("=", 1) for x in args.dispatch_baseline)
        report = verify(args.archive, args.fresh, args.battery, json.loads(args.versions),
                        args.baseline, own, args.confidence, study=args.study)
        write_json(report, args.out)
        verdict = {True: "pass", False: "FAIL", None: "another stack: agreement reported"}
        print(f"{args.out}: {verdict[report['passed']]} "
              f"({report['n_mismatches']} row mismatches, "
              f"{sum(not r['passed'] for r in report['rates'])} rate disagreements)")
    return 0
