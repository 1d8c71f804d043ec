"""The flags that several commands share: one definition each (type, names, help)."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from rtlocal.constants import STRICTNESS_PRESETS

STRICTNESS_HELP = (
    "Preset (" + ", ".join(STRICTNESS_PRESETS) + ") or a number in [0,1], for all categories or per category: "
    "'strict', '0.7', 'safety=strict,humanizing=off'."
)
THRESHOLD_HELP = "Raw thresholds in [0,1] per category, 'off' or 'force': 'safety=0.35', 'all=0.5'. Wins over --strictness."

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="GGUF path or model name (default: RTLOCAL_MODEL, config, or the built default).")]
StrictOpt = Annotated[Optional[str], typer.Option("--strictness", "-s", help=STRICTNESS_HELP)]
ThresholdOpt = Annotated[Optional[str], typer.Option("--threshold", "-t", help=THRESHOLD_HELP)]
BiasOpt = Annotated[Optional[str], typer.Option("--bias", help="Logit biases for --mode bias: 'safety=2,all=-1'.")]
ModeOpt = Annotated[str, typer.Option("--mode", help="threshold (default), bias, or free (no intervention).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).", min=1)]
CtxOpt = Annotated[Optional[int], typer.Option("--ctx", help="Context length in tokens (default 4096).", min=64)]
GpuOpt = Annotated[Optional[int], typer.Option("--n-gpu-layers", help="Layers to offload to Metal/CUDA (-1: all). Default 0 (CPU).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed (default: random).")]
TempOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature for the answer (0 = greedy).", min=0.0)]
MaxTokOpt = Annotated[int, typer.Option("--max-tokens", "-n", help="Maximum answer tokens.", min=1)]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output file even when it is not of the kind this command writes.")]
CalibOpt = Annotated[
    Optional[Path],
    typer.Option("--calibration", help="A profile from `rtlocal calibrate`: --strictness then means its measured rates (instead of the model's own table)."),
]
