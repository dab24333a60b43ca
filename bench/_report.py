"""What the vLLM bench scripts share: their server settings from the command line, and the
tail that prints a summary as JSON and keeps it in a file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def emit(summary: dict[str, Any], out: Path | None) -> int:
    """Print ``summary`` (indented JSON), write the same text to ``out`` when given; 0."""
    text = json.dumps(summary, indent=2)
    print(text)
    if out:
        out.write_text(text)
    return 0


def server_block(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The ``server`` settings of a bench launch: 2048-token context, prefix caching off,
    the command line's ``--gpu-memory-utilization``, ``--eager`` and
    ``--attention-backend`` when given, then ``extra``."""
    server: dict[str, Any] = {"max_model_len": 2048, "enable_prefix_caching": False, **extra}
    if args.gpu_memory_utilization is not None:
        server["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.eager is not None:
        server["enforce_eager"] = args.eager
    if args.attention_backend:
        server["attention_backend"] = args.attention_backend
    return server
