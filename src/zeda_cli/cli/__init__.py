"""The ``zeda`` command line: a thin Typer app; ``zeda <command>`` lives in ``cli/<command>.py``."""

from __future__ import annotations

import os

import typer

from . import calibrate, convert, distill, eval, export, inject, inspect, push, rollout
from .options import examples

app = typer.Typer(
    name="zeda",
    help="Turn post-trained static MoE LLMs into dynamic ones that skip zero experts (ZEDA, arXiv 2605.18643).\n\n"
    "Pipeline: inspect -> inject-zero-experts -> distill --stage 1 -> distill --stage 2 -> export, "
    "or all at once with convert.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 119},
    epilog=examples(
        "zeda inspect Qwen/Qwen3-30B-A3B",
        "zeda convert Qwen/Qwen3-30B-A3B --out ./dyn",
        "zeda push ./dyn/export my-org/Qwen3-30B-A3B-ZEDA",
    ),
)

app.command("inspect", epilog=inspect.EPILOG)(inspect.inspect)
app.command("inject-zero-experts", epilog=inject.EPILOG)(inject.inject_zero_experts)
app.command("rollout", epilog=rollout.EPILOG)(rollout.rollout)
app.command("distill", epilog=distill.EPILOG)(distill.distill)
app.command("eval", epilog=eval.EPILOG)(eval.eval_model)
app.command("calibrate", epilog=calibrate.EPILOG)(calibrate.calibrate)
app.command("export", epilog=export.EPILOG)(export.export)
app.command("push", epilog=push.EPILOG)(push.push)
app.command("convert", epilog=convert.EPILOG)(convert.convert)


def quiet_libraries() -> None:
    """Library chatter off the console: our own progress and logs say what is happening."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # libraries' bars (weight loading, datasets, lm-eval)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver: DeepSpeed would warn that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    quiet_libraries()
    app()
