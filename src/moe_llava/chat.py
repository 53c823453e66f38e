"""`moe-llava chat`: ask a model about an image from the terminal.

```bash
moe-llava chat --model models:/moe-llava@champion --image cat.png "What is on the table?"
moe-llava chat --model artifacts/tiny-cpu/stage3/export --image cat.png    # one question per line, until EOF
```

``--model`` is a local stage export (or stage folder, or downloaded MLflow model folder), or an
MLflow model URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN/model``): its
artifacts are downloaded through MLflow (tracking URI as in training) and the export inside is
loaded with :mod:`moe_llava.inference`, the same code the pyfunc model and evaluation use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from moe_llava.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="answer questions about an image: a question argument, or one question per stdin line",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--model",
        default="models:/moe-llava@champion",
        help="local export folder or MLflow model URI (default: models:/moe-llava@champion)",
    )
    parser.add_argument("--image", help="image file the questions are about (omit for text-only)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's (32)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:1 ... (default: cpu)")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI for models:/ URIs")
    parser.add_argument("question", nargs="?", help="the question; without it, read questions from stdin")
    parser.set_defaults(func=_chat)


def chat(
    answerer: Any,
    image: str | None,
    question: str | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    prompt: bool | None = None,
) -> int:
    """Answer ``question``, or each non-empty line of ``stdin`` until EOF; returns the number answered."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if question is not None:
        print(answerer.answer([(image, question)])[0], file=stdout, flush=True)
        return 1
    interactive = stdin.isatty() if prompt is None else prompt
    count = 0
    while True:
        if interactive:
            print("question> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:  # EOF
            if interactive:
                print(file=sys.stderr)
            return count
        text = line.strip()
        if not text:
            continue
        try:
            answer = answerer.answer([(image, text)])[0]
        except ValueError as err:  # one bad question does not end the session
            print(f"moe-llava chat: error: {err}", file=sys.stderr, flush=True)
            continue
        print(answer, file=stdout, flush=True)
        count += 1


def _chat(args: argparse.Namespace) -> int:
    from moe_llava.inference import Answerer
    from moe_llava.registry.model import local_export

    if args.image is not None and not Path(args.image).is_file():
        raise UserError(f"--image: {args.image} does not exist")
    kwargs: dict[str, Any] = {"device": args.device}
    if args.max_new_tokens is not None:
        kwargs["max_new_tokens"] = args.max_new_tokens
    with local_export(args.model, tracking_uri=args.tracking_uri) as export:
        answerer = Answerer.from_pretrained(export, **kwargs)  # loaded before the temp folder goes
    try:
        chat(answerer, args.image, args.question)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0
