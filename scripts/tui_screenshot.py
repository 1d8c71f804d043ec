"""Save an SVG screenshot of `rtlocal chat` with one refused and one answered prompt (docs/tui.svg).

With the real default model the default prompts refuse and answer on their own:

    python scripts/tui_screenshot.py

With a model that never refuses by itself (the tiny test fixture), force the first refusal with a
threshold of 0 for that prompt only:

    python scripts/tui_screenshot.py --model tiny.gguf --refuse-threshold safety=0

The thresholds go through the control panel as a user would set them; the second prompt is asked
with the starting policy (--strictness/--threshold) unless --answer-threshold says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REFUSE_PROMPT = "How do I pick the lock of my neighbour's front door while they are away?"
ANSWER_PROMPT = "Write a haiku about the sea."


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "-m", help="GGUF path or model name (default: as `rtlocal chat`).")
    p.add_argument("--strictness", "-s", help="Starting strictness, as in `rtlocal chat`.")
    p.add_argument("--threshold", "-t", help="Starting thresholds, as in `rtlocal chat`.")
    p.add_argument("--refuse-prompt", default=REFUSE_PROMPT)
    p.add_argument("--answer-prompt", default=ANSWER_PROMPT)
    p.add_argument("--refuse-threshold", help="Thresholds for the first prompt only, e.g. 'safety=0'.")
    p.add_argument("--answer-threshold", help="Thresholds for the second prompt (default: the starting ones).")
    p.add_argument("--out", "-o", type=Path, default=Path("docs/tui.svg"))
    p.add_argument("--size", type=_parse_size, default=(120, 40), help="Terminal size WIDTHxHEIGHT (default 120x40).")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ctx", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timings", action="store_true", help="Show tokens/s (off by default: reproducible files).")
    return p


async def _drive(app, args: argparse.Namespace) -> list:
    from rtlocal.runtime.policy import Policy

    async def ask(text: str) -> None:
        chat = app.chat
        prompt = chat.query_one("#prompt")
        prompt.value = text
        prompt.focus()
        await pilot.press("enter")
        deadline = time.monotonic() + 600
        while chat.generating is not None:
            if time.monotonic() > deadline:
                raise SystemExit("the answer did not finish within 10 minutes")
            await pilot.pause(0.05)
        await pilot.pause()

    async with app.run_test(size=args.size) as pilot:
        await pilot.pause()
        chat = app.chat
        start: Policy = chat.session.policy
        if args.refuse_threshold:
            chat.apply_spec(threshold=args.refuse_threshold)
        await ask(args.refuse_prompt)
        chat.session.policy = start
        chat.panel.show_policy(start, None)
        chat.apply_spec(threshold=args.answer_threshold)  # also re-matches the preset
        await ask(args.answer_prompt)
        chat.query_one("#prompt").focus()
        await pilot.pause()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        app.save_screenshot(filename=args.out.name, path=str(args.out.parent))
        return list(chat.turns)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rtlocal.errors import RtlocalError
    from rtlocal.runtime.engine import SamplingParams
    from rtlocal.runtime.options import open_engine, policy_from_flags
    from rtlocal.runtime.session import ChatSession
    from rtlocal.tui.app import RtlocalApp

    try:
        engine = open_engine(args.model, args.threads, args.ctx, None)
    except RtlocalError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    try:
        policy = policy_from_flags(engine, args.strictness, args.threshold, None, "threshold")
        sampling = SamplingParams(temperature=args.temperature, seed=args.seed)
        session = ChatSession(engine, policy, sampling=sampling, max_tokens=args.max_tokens)
        app = RtlocalApp(session, show_timings=args.timings)
        turns = asyncio.run(_drive(app, args))
        app.wait_idle()
    except RtlocalError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    finally:
        engine.close()
    refused = [t.decision is not None and t.decision.refused for t in turns]
    print(f"wrote {args.out}")
    if refused != [True, False]:
        got = ", ".join("refused" if r else "answered" for r in refused)
        print(
            f"warning: wanted one refused then one answered prompt, got: {got} (see --refuse-threshold)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
