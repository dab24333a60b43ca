"""``batchflip fidelity``: recompute the paper's published statistics from their inputs.

Reads ``published.yaml`` (by default the bundled ``batchflip/data/fidelity/published.yaml``;
see the comment at its top), checks that every input and every printed value carries a
provenance mark (``published: <where>`` or ``derived: <how>``; a derived input also says
``uses_printed``), recomputes each entry of ``numbers`` with :mod:`batchflip.stats`, and
writes a JSON file::

    {"numbers": {id: {"value": ..., "published": ..., "printed": "...", "precision": ...,
                      "formatted": "...", "oracle": "independent" | "circular" | "none",
                      "oracle_note": "...", "match": true | false | null,
                      "definition": ..., "inputs": [...], "provenance": {...},
                      "recipe": ..., "source": ..., "unit": ...}},
     "summary": {"checked": n, "matched": m, "mismatched": [ids], "circular": [ids],
                 "unprinted": [ids], "all_match": bool}}

``value`` is on the printed scale (percent for percentages). ``oracle`` says whether the
printed value can test the recomputation: ``independent`` when it is published and no input
was derived from it; ``circular`` when an input was back-solved from it (``uses_printed``) or
the printed value is itself derived (computed from the same inputs); ``none`` when nothing is
printed. ``match`` is claimed for independent oracles only: True when the recomputed value,
rounded to the precision of the printed string, gives the same string; null otherwise.
With ``--strict`` the command exits 1 when any independent oracle does not match (after
writing the JSON).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from batchflip import stats
from batchflip.bundled import PUBLISHED, bundled_path, shown
from batchflip.errors import BatchflipError, InputError
from batchflip.io import write_json

DEFAULT_PUBLISHED = f"batchflip/data/{PUBLISHED}"  # how the bundled table is named

Recipe = Callable[[Mapping[str, Any], Mapping[str, list[dict[str, Any]]]], dict[str, float]]


# --------------------------------------------------------------------------- recipes


def _num(inputs: Mapping[str, Any], key: str) -> Any:
    if key not in inputs:
        raise BatchflipError(f"missing input '{key}'")
    return inputs[key]


def _table(
    inputs: Mapping[str, Any], tables: Mapping[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    name = _num(inputs, "table")
    if name not in tables:
        raise BatchflipError(f"unknown table '{name}' (known: {sorted(tables)})")
    rows = tables[name]
    if not isinstance(rows, list) or not rows:
        raise BatchflipError(f"table '{name}' must be a non-empty list of rows")
    return rows


def _column(rows: list[dict[str, Any]], column: str, table: str) -> list[Any]:
    out = []
    for i, row in enumerate(rows):
        if column not in row:
            raise BatchflipError(f"table '{table}' row {i} lacks column '{column}'")
        out.append(row[column])
    return out


def _recipe_proportion(inputs: Mapping[str, Any], tables: Any) -> dict[str, float]:
    k, n = stats._check_k_n(_num(inputs, "k"), _num(inputs, "n"))
    return {"estimate": k / n}


def _recipe_wilson(inputs: Mapping[str, Any], tables: Any) -> dict[str, float]:
    iv = stats.wilson_interval(_num(inputs, "k"), _num(inputs, "n"))
    return {"low": iv.low, "high": iv.high}


def _recipe_clopper_pearson(inputs: Mapping[str, Any], tables: Any) -> dict[str, float]:
    iv = stats.clopper_pearson_interval(_num(inputs, "k"), _num(inputs, "n"))
    return {"low": iv.low, "high": iv.high}


def _recipe_rate_times_share(inputs: Mapping[str, Any], tables: Any) -> dict[str, float]:
    share = _recipe_proportion(inputs, tables)["estimate"]
    return {"value": float(_num(inputs, "rate")) * share}


def _recipe_ratio(inputs: Mapping[str, Any], tables: Any) -> dict[str, float]:
    den = float(_num(inputs, "denominator"))
    if den == 0:
        raise BatchflipError("denominator is 0")
    return {"value": float(_num(inputs, "numerator")) / den}


def _recipe_anova(
    inputs: Mapping[str, Any], tables: Mapping[str, list[dict[str, Any]]]
) -> dict[str, float]:
    rows = _table(inputs, tables)
    name = inputs["table"]
    values = _column(rows, _num(inputs, "value"), name)
    groups = _column(rows, _num(inputs, "group"), name)
    res = stats.anova_by_group(values, groups)
    return {
        "statistic": res.statistic,
        "p_value": res.p_value,
        "eta_squared": res.eta_squared,
        "df_between": float(res.df_between),
        "df_within": float(res.df_within),
    }


def _recipe_mde(inputs: Mapping[str, Any], tables: Any) -> dict[str, float]:
    value = stats.minimum_detectable_effect(
        _num(inputs, "p"),
        _num(inputs, "n"),
        z_alpha=float(inputs.get("z_alpha", 1.96)),
        z_power=float(inputs.get("z_power", 0.842)),
    )
    return {"value": value}


def _recipe_column_sum(
    inputs: Mapping[str, Any], tables: Mapping[str, list[dict[str, Any]]]
) -> dict[str, float]:
    rows = _table(inputs, tables)
    col = _column(rows, _num(inputs, "column"), inputs["table"])
    return {"value": float(sum(stats._as_count(v, "column value") for v in col))}


def _recipe_mcnemar_exact(inputs: Mapping[str, Any], tables: Any) -> dict[str, float]:
    res = stats.mcnemar_exact(_num(inputs, "b"), _num(inputs, "c"))
    return {"p_value": res.p_value, "statistic": res.statistic}


RECIPES: dict[str, tuple[Recipe, str]] = {
    "proportion": (_recipe_proportion, "k / n"),
    "wilson": (_recipe_wilson, "batchflip.stats.wilson_interval(k, n), 95%"),
    "clopper_pearson": (
        _recipe_clopper_pearson,
        "batchflip.stats.clopper_pearson_interval(k, n), 95%",
    ),
    "rate_times_share": (_recipe_rate_times_share, "rate x k / n"),
    "ratio": (_recipe_ratio, "numerator / denominator"),
    "anova": (_recipe_anova, "batchflip.stats.anova_by_group(value, group)"),
    "mde": (_recipe_mde, "batchflip.stats.minimum_detectable_effect(p, n, z_alpha, z_power)"),
    "column_sum": (_recipe_column_sum, "sum of a table column"),
    "mcnemar_exact": (_recipe_mcnemar_exact, "batchflip.stats.mcnemar_exact(b, c)"),
}


# --------------------------------------------------------------------------- precision


def parse_printed(printed: str) -> tuple[str, int]:
    """Return the precision of a printed number: ("decimals", d) or ("significant", s).

    "0.127" -> ("decimals", 3); "27" -> ("decimals", 0); "4.77e-7" -> ("significant", 3).
    """
    text = printed.strip()
    try:
        float(text)
    except ValueError:
        raise BatchflipError(f"printed value {printed!r} is not a number") from None
    if "e" in text.lower():
        mantissa = text.lower().split("e")[0].lstrip("+-")
        digits = mantissa.replace(".", "").lstrip("0")
        return "significant", max(len(digits), 1)
    if "." in text:
        return "decimals", len(text.split(".")[1])
    return "decimals", 0


def format_at(value: float, precision: tuple[str, int]) -> str:
    """Format ``value`` at a precision from :func:`parse_printed` (round half to even on
    the binary value, as Python's format does)."""
    kind, digits = precision
    if kind == "significant":
        return f"{value:.{digits - 1}e}"
    text = f"{value:.{digits}f}"
    # "-0.0" and "0.0" are the same printed number
    if text.lstrip("-").strip("0.") == "":
        text = text.lstrip("-")
    return text


def _describe_precision(precision: tuple[str, int]) -> str:
    kind, digits = precision
    return f"{digits} significant figures" if kind == "significant" else f"{digits} decimals"


# --------------------------------------------------------------------------- driver


MARKS = ("published", "derived")
SELECTORS = ("value", "group", "column")  # table columns a recipe reads, named in `select`


def _mark(item: Any, source: str, where: Any, field: str, *, is_input: bool) -> dict[str, Any]:
    """The provenance of one input or printed value: {"mark", "source", "uses_printed"};
    a missing, doubled or empty mark raises InputError naming the entry and field."""
    if not isinstance(item, Mapping) or "value" not in item:
        raise InputError(source, "needs a mapping {value: ..., published: <where>} or "
                         "{value: ..., derived: <how>} (provenance mark missing)",
                         row=where, field=field)
    marks = [m for m in MARKS if m in item]
    if len(marks) != 1:
        raise InputError(source, f"needs exactly one provenance mark ({' or '.join(MARKS)}), "
                         f"got {marks or 'none'}", row=where, field=field)
    mark = marks[0]
    text = item[mark]
    if not isinstance(text, str) or not text.strip():
        raise InputError(source, f"'{mark}' must say where the value comes from",
                         row=where, field=field)
    extra = set(item) - {"value", mark, "uses_printed"}
    if extra:
        raise InputError(source, f"unknown keys {sorted(extra)}", row=where, field=field)
    uses = item.get("uses_printed")
    if mark == "derived" and is_input:
        if not isinstance(uses, bool):
            raise InputError(source, "a derived input must say uses_printed: true | false "
                             "(back-solved from this entry's printed value?)",
                             row=where, field=field)
    elif uses is not None:
        raise InputError(source, "uses_printed belongs to derived inputs only",
                         row=where, field=field)
    return {"mark": mark, "source": " ".join(text.split()), "uses_printed": bool(uses)}


def _input_strings(
    inputs: Mapping[str, Any], provenance: Mapping[str, Mapping[str, Any]],
    select: Mapping[str, Any], tables: Mapping[str, list[dict[str, Any]]], source: str
) -> list[str]:
    out = []
    for key, value in inputs.items():
        prov = provenance[key]
        tag = prov["mark"] + (", from the printed value" if prov["uses_printed"] else "")
        if key == "table" and value in tables:
            out.append(f"{source}#tables.{value} ({len(tables[value])} rows) [{tag}]")
        else:
            out.append(f"{key}={value} [{tag}]")
    out += [f"{key}={value}" for key, value in select.items()]
    return out


def _oracle(provenance: Mapping[str, Mapping[str, Any]], printed: Mapping[str, Any] | None
            ) -> tuple[str, str]:
    """(oracle, note) of an entry: independent, circular or none."""
    if printed is None:
        return "none", "not printed in the paper: recomputed for the report, nothing to match"
    back = sorted(k for k, p in provenance.items() if p["uses_printed"])
    if back:
        return "circular", (f"input(s) {', '.join(back)} were derived from the printed value "
                            "itself, so the recomputation reproduces it by construction: no "
                            "match is claimed")
    if printed["mark"] == "derived":
        return "circular", ("the value compared with is not printed by the paper; it was "
                            f"derived ({printed['source']}): no match is claimed")
    derived = sorted(k for k, p in provenance.items() if p["mark"] == "derived")
    note = "printed value published; inputs published"
    if derived:
        note += (f" or derived without it ({', '.join(derived)}: "
                 + "; ".join(provenance[k]["source"] for k in derived) + ")")
    return "independent", note


def _recompute(entry: Mapping[str, Any], where: Any, tables: Mapping[str, Any],
               source: str) -> tuple[float, dict[str, Any], dict[str, Any], Mapping[str, Any]]:
    """Check one entry's recipe, inputs and selectors and recompute its scaled value.
    Returns ``(value, inputs, provenance, select)``."""
    for field in ("id", "recipe", "inputs", "output", "definition"):
        if field not in entry:
            raise InputError(source, "missing", row=where, field=field)
    recipe_name = entry["recipe"]
    if recipe_name not in RECIPES:
        raise InputError(
            source, f"unknown recipe (known: {sorted(RECIPES)})", row=where, field="recipe"
        )
    recipe = RECIPES[recipe_name][0]
    raw_inputs = entry["inputs"]
    if not isinstance(raw_inputs, Mapping) or not raw_inputs:
        raise InputError(source, "must be a non-empty mapping", row=where, field="inputs")
    provenance = {str(key): _mark(item, source, where, f"inputs.{key}", is_input=True)
                  for key, item in raw_inputs.items()}
    inputs = {str(key): item["value"] for key, item in raw_inputs.items()}
    select = entry.get("select") or {}
    if not isinstance(select, Mapping) or any(
            k not in SELECTORS or not isinstance(v, str) for k, v in select.items()):
        raise InputError(source, f"must map {list(SELECTORS)} to column names",
                         row=where, field="select")
    if set(select) & set(inputs):
        raise InputError(source, f"names {sorted(set(select) & set(inputs))} that "
                         "inputs also name", row=where, field="select")
    try:
        outputs = recipe({**inputs, **select}, tables)
    except BatchflipError as exc:
        raise InputError(source, str(exc), row=where, field="inputs") from None
    if entry["output"] not in outputs:
        raise InputError(source, f"recipe gives {sorted(outputs)}", row=where, field="output")
    value = float(outputs[entry["output"]]) * float(entry.get("scale", 1)) + 0.0
    if not math.isfinite(value):
        raise InputError(source, f"recomputed value is {value}", row=where)
    return value, inputs, provenance, select


def _comparison(entry: Mapping[str, Any], value: float, printed_mark: dict[str, Any] | None,
                oracle: str) -> dict[str, Any]:
    """The printed value at its precision beside the recomputed one; ``match`` only for an
    independent oracle."""
    raw_printed = entry.get("printed")
    if raw_printed is None:
        decimals = int(entry.get("decimals", 3))
        return {"published": None, "printed": None, "precision": f"{decimals} decimals",
                "formatted": format_at(value, ("decimals", decimals)), "match": None}
    printed = str(raw_printed["value"])
    precision = parse_printed(printed)
    formatted = format_at(value, precision)
    published_text = format_at(float(printed), precision)
    return {
        "published": float(printed) if printed_mark["mark"] == "published" else None,
        "printed": printed,
        "precision": _describe_precision(precision),
        "formatted": formatted,
        "match": formatted == published_text if oracle == "independent" else None,
    }


NOT_REPRODUCIBLE = "not reproducible from printed inputs"


def _not_reproducible(entries: Any, source: str) -> dict[str, dict[str, Any]]:
    """Published values the printed inputs cannot reproduce: each with what was printed,
    where, and why (``reason``); never compared, never a match."""
    if not isinstance(entries, list):
        raise InputError(source, "must be a list", field="not_reproducible")
    out: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise InputError(source, "entry must be a mapping", row=i, field="not_reproducible")
        for field in ("id", "definition", "printed", "reported", "reason"):
            if not entry.get(field):
                raise InputError(source, f"not_reproducible entry lacks '{field}'", row=i,
                                 field=field)
        if entry["id"] in out:
            raise InputError(source, "duplicate id", row=entry["id"], field="id")
        out[str(entry["id"])] = {
            "id": entry["id"], "definition": " ".join(str(entry["definition"]).split()),
            "printed": str(entry["printed"]), "reported": str(entry["reported"]),
            "reason": " ".join(str(entry["reason"]).split()), "oracle": NOT_REPRODUCIBLE,
            "match": None,
        }
    return out


def compute_fidelity(published: Mapping[str, Any], source: str = DEFAULT_PUBLISHED) -> dict:
    """Recompute every entry of a loaded ``published.yaml`` and return the JSON document."""
    if not isinstance(published, Mapping) or "numbers" not in published:
        raise InputError(source, "expected a mapping with a 'numbers' list")
    tables = published.get("tables") or {}
    if not isinstance(tables, Mapping):
        raise InputError(source, "must be a mapping of table name -> rows", field="tables")
    entries = published["numbers"]
    if not isinstance(entries, list) or not entries:
        raise InputError(source, "must be a non-empty list", field="numbers")

    numbers: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise InputError(source, "entry must be a mapping", row=i)
        ident = entry.get("id")
        where = ident if ident else i
        if ident is not None and ident in numbers:
            raise InputError(source, "duplicate id", row=where, field="id")
        value, inputs, provenance, select = _recompute(entry, where, tables, source)
        raw_printed = entry.get("printed")
        printed_mark = (None if raw_printed is None
                        else _mark(raw_printed, source, where, "printed", is_input=False))
        oracle, oracle_note = _oracle(provenance, printed_mark)
        numbers[str(ident)] = {
            "id": ident,
            "value": value,
            "definition": str(entry["definition"]).strip(),
            "inputs": _input_strings(inputs, provenance, select, tables, source),
            "provenance": {"inputs": provenance, "printed": printed_mark},
            "recipe": f"{entry['recipe']}: {RECIPES[entry['recipe']][1]} -> {entry['output']}",
            "scale": float(entry.get("scale", 1)),
            "unit": entry.get("unit", ""),
            "source": printed_mark["source"] if printed_mark else "",
            "oracle": oracle,
            "oracle_note": oracle_note,
            **_comparison(entry, value, printed_mark, oracle),
        }

    checked = [k for k, r in numbers.items() if r["oracle"] == "independent"]
    mismatched = [k for k in checked if not numbers[k]["match"]]
    unreproducible = _not_reproducible(published.get("not_reproducible") or [], source)
    return {
        "numbers": numbers,
        **({"not_reproducible": unreproducible} if unreproducible else {}),
        "summary": {
            "source": source,
            "checked": len(checked),
            "matched": len(checked) - len(mismatched),
            "mismatched": mismatched,
            "circular": [k for k, r in numbers.items() if r["oracle"] == "circular"],
            "unprinted": [k for k, r in numbers.items() if r["oracle"] == "none"],
            "not_reproducible": sorted(unreproducible),
            "all_match": not mismatched,
        },
    }


def load_published(path: str | Path) -> dict:
    """Load ``published.yaml``; a missing or malformed file raises InputError."""
    p = Path(path)
    try:
        with p.open() as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise InputError(p, "file not found") from None
    except yaml.YAMLError as exc:
        raise InputError(p, f"invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(p, "expected a mapping at the top level")
    return data


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``fidelity`` arguments."""
    parser.add_argument(
        "--published",
        help=f"YAML of published inputs and values (default: the bundled {DEFAULT_PUBLISHED})",
    )
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 when an independent published value is not reproduced",
    )


def shown_path(path: str | Path) -> str:
    """How the numbers name ``path``: ``batchflip/data/...`` for the bundled table, else
    relative to the working directory when inside it (so the numbers do not depend on where
    the package or the run directory is), else as given."""
    bundled = shown(path)
    if bundled is not None:
        return bundled
    p, cwd = Path(path).resolve(), Path.cwd().resolve()
    return p.relative_to(cwd).as_posix() if p.is_relative_to(cwd) else str(path)


def main(args: argparse.Namespace) -> int:
    """Recompute, write the JSON atomically, print a one-line summary (and mismatches)."""
    path = args.published or bundled_path(PUBLISHED)
    doc = compute_fidelity(load_published(path), source=shown_path(path))
    write_json(doc, args.out)
    summary = doc["summary"]
    print(
        f"fidelity: {summary['matched']}/{summary['checked']} published values reproduced "
        f"from independent inputs ({len(summary['circular'])} circular, no match claimed) "
        f"-> {args.out}"
    )
    for ident in summary["mismatched"]:
        rec = doc["numbers"][ident]
        print(
            f"fidelity: MISMATCH {ident}: recomputed {rec['formatted']} vs printed "
            f"{rec['printed']}",
            file=sys.stderr,
        )
    return 1 if (args.strict and summary["mismatched"]) else 0
