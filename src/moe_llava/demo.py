"""`moe-llava demo`: the smallest end-to-end run of the model API, on CPU in seconds.

Builds the tiny recipe, checks the upcycling identity (MoE logits == dense logits), trains the
MoE model for a few steps to name the colour of solid-colour images, saves and reloads it
through safetensors, and answers with a KV-cached greedy generation. `make run` calls this until
the full three-stage pipeline lands.
"""

from __future__ import annotations

import argparse
import tempfile
import time

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="tiny end-to-end run of the model API (seconds, CPU)")
    parser.add_argument("--steps", type=int, default=60, help="MoE training steps (default: 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_demo)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moe_llava.constants import IMAGE_TOKEN

    words = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, "what", "colour", "?", *COLOURS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN],
    )


def run_demo(args: argparse.Namespace) -> int:
    import torch
    from hydra.utils import instantiate
    from PIL import Image

    from moe_llava.constants import IGNORE_INDEX
    from moe_llava.model import count_parameters
    from moe_llava.model.builder import build_image_processor
    from moe_llava.model.checkpoint import load_export_model
    from moe_llava.model.recipes import load_recipe

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    recipe = load_recipe("tiny")
    tokenizer = _tokenizer()
    model = instantiate(recipe, tokenizer=tokenizer)
    processor = build_image_processor(recipe.vision_tower, pretrained=recipe.pretrained)
    n_img = model.num_image_tokens

    names = list(COLOURS)
    pixels = processor(images=[Image.new("RGB", (64, 64), COLOURS[c]) for c in names], return_tensors="pt")
    pixel_values = pixels["pixel_values"]
    prompt = tokenizer("what colour ?", add_special_tokens=False)["input_ids"]
    answers = [tokenizer.convert_tokens_to_ids(c) for c in names]
    image_ids = [model.config.image_token_id] * n_img
    input_ids = torch.tensor(
        [[tokenizer.bos_token_id, *image_ids, *prompt, a, tokenizer.eos_token_id] for a in answers]
    )
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -2:] = input_ids[:, -2:]  # loss on the answer and its end-of-turn token only

    model.eval()
    with torch.no_grad():
        dense_logits = model(input_ids, pixel_values).logits
        moe_layers = model.upcycle(
            num_experts=4, top_k=2, layers="sparse", capacity_factor=1.5, eval_capacity_factor=2.0
        )
        identity_error = (model(input_ids, pixel_values).logits - dense_logits).abs().max().item()
    counts = count_parameters(model)
    print(
        f"tiny MoE-LLaVA: MoE layers {moe_layers}, {counts.total:,} parameters, {counts.activated:,} activated/token"
    )
    print(f"upcycling identity: max |logits(MoE) - logits(dense)| = {identity_error:.2e}")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(1, args.steps + 1):
        out = model(input_ids, pixel_values, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 20 == 0 or step == args.steps:
            print(
                f"step {step:3d}  loss {out.loss.item():.4f}  lm {out.lm_loss.item():.4f}  aux {out.aux_loss.item():.4f}"
            )
    model.eval()

    with tempfile.TemporaryDirectory() as export_dir:
        model.save_pretrained(export_dir)
        reloaded = load_export_model(export_dir).eval()
    prompts = input_ids[:, :-2]
    generated = reloaded.generate(prompts, pixel_values, max_new_tokens=2, do_sample=False, pad_token_id=0)
    correct = 0
    for colour, tokens in zip(names, generated):
        answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        correct += answer == colour
        print(f"  {colour:>6} image -> {answer!r}")
    load = {name.split(".")[2]: stats.top1.tolist() for name, stats in reloaded.router_stats().items()}
    print(f"top-1 tokens per expert by MoE layer (latest forward): {load}")
    print(f"{correct}/{len(names)} correct after save/reload; {time.perf_counter() - start:.1f}s")
    return 0 if identity_error < 1e-4 else 1
