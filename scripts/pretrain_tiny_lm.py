"""Pretrain the tiny two-digit-addition language model shipped in `assets/tiny-lm`.

The text policy's real targets are chat LMs; this script builds one small enough to fine-tune on a laptop CPU that
loads through the very same `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(path)` code path.

- Tokenizer: one token per character of "0123456789+=" plus <pad>, <bos>, <eos>, <unk>, built with `tokenizers` and
  wrapped as a `PreTrainedTokenizerFast` (BOS is prepended to every text).
- Model: a 2-layer Llama-style decoder (64 wide, tied embeddings).
- Data: prompts "a+b=" for a, b in 10..99 and targets "<sum><eos>". The 8100 pairs are shuffled once (seeded) into 100
  held-out prompts (`assets/addition_heldout_prompts.txt`, never trained on, neither here nor by RL), 200 development
  prompts that decide when to stop, and the rest for pretraining. RL fine-tunes on every pair that is not held out
  (`assets/addition_train_prompts.txt`, 8000 prompts): with a few hundred RL prompts, each seen many times, the policy
  memorised their answers instead of getting better at addition.
- Training stops early, as soon as exact-match accuracy on the development prompts at temperature 0.7 reaches
  `--target-accuracy`: the model is deliberately mediocre so that RL has room to improve it.

The shipped model stopped after 450 steps (about 30 s on one CPU thread); its held-out accuracy at temperature 0.7 is
0.53 (mean over 5 sampling seeds), while greedy decoding gets about 0.86 of them right: most of RL's room is in making
the sampled answer the model's most likely one.

Run from the repo root:  .venv/bin/python scripts/pretrain_tiny_lm.py
Only re-score the saved model:  .venv/bin/python scripts/pretrain_tiny_lm.py --evaluate-only

`--carry-drop P` builds the harder text task's model, `assets/tiny-lm-carry` (Figure 3's text task): in its pretraining
data, a sum whose units digits carry is written without the carry (`17+25=32`) with probability P, the way a careless
student adds. Trained until its answers on the other sums are right (`--target-accuracy` then counts only those), it
learns the careless answer as the most likely one wherever there is a carry, so no temperature gets those sums right
more than about 1 - P of the time: RL with a verifier has to move probability mass, not only sharpen it.

    .venv/bin/python scripts/pretrain_tiny_lm.py --carry-drop 0.75 --target-accuracy 0.9 --out assets/tiny-lm-carry
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rebel_diffusion.rewards.text import addition_correct

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
CHARS = "0123456789+="
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
MAX_NEW_TOKENS = 4  # the longest sum, 198, is three digits plus EOS
TEMPERATURE = 0.7


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer that prepends <bos>; <pad> and <eos> are distinct tokens."""
    vocab = {token: i for i, token in enumerate(list(SPECIALS) + list(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Characters are whole tokens: decoding joins them without spaces.
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A 2-layer, 64-wide Llama-style decoder over the character vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def split_pairs(seed: int) -> dict[str, list[tuple[int, int]]]:
    """Held-out, development and pretraining (a, b) pairs, disjoint, and the RL pairs: all but the held-out ones."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return {"heldout": pairs[:100], "dev": pairs[100:300], "pretrain": pairs[300:], "rl": pairs[100:]}


def prompt(pair: tuple[int, int]) -> str:
    """The prompt asking for the sum of `pair`."""
    return f"{pair[0]}+{pair[1]}="


def carries(pair: tuple[int, int]) -> bool:
    """Whether adding the units digits of `pair` carries into the tens."""
    return pair[0] % 10 + pair[1] % 10 >= 10


def written_sum(pair: tuple[int, int], carry_drop: float, rng: random.Random) -> int:
    """The answer the pretraining data gives: the sum, or with probability `carry_drop`, when the units carry, the sum
    without that carry (ten less)."""
    total = sum(pair)
    return total - 10 if carries(pair) and rng.random() < carry_drop else total


def training_batch(pairs: list[tuple[int, int]], tokenizer: PreTrainedTokenizerFast, carry_drop: float = 0.0,
                   rng: random.Random | None = None) -> dict[str, torch.Tensor]:
    """Right-padded "<bos>a+b=<answer><eos>" sequences with labels only on the answer and EOS (`written_sum`)."""
    input_ids, labels = [], []
    for pair in pairs:
        prompt_ids = tokenizer(prompt(pair))["input_ids"]
        answer = written_sum(pair, carry_drop, rng) if carry_drop else sum(pair)
        target_ids = tokenizer(str(answer), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids.append(prompt_ids + target_ids)
        labels.append([-100] * len(prompt_ids) + target_ids)
    length = max(map(len, input_ids))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (length - len(ids)) for ids in input_ids]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in input_ids]),
        "labels": torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels]),
    }


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, prompts: list[str], seed: int,
             temperature: float = TEMPERATURE) -> float:
    """Exact-match rate of responses sampled at `temperature` (0.7: the quickstart policy's setting)."""
    model.eval()
    torch.manual_seed(seed)
    encoded = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    sequences = model.generate(
        **encoded, do_sample=True, max_new_tokens=MAX_NEW_TOKENS, temperature=temperature, top_k=0, top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    responses = tokenizer.batch_decode(sequences[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(addition_correct(p, r) for p, r in zip(prompts, responses)) / len(prompts)


def write_prompts(path: Path, pairs: list[tuple[int, int]]) -> None:
    """One prompt per line."""
    path.write_text("".join(prompt(pair) + "\n" for pair in pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS / "tiny-lm")
    parser.add_argument("--prompts-dir", type=Path, default=ASSETS, help="where the prompt lists are written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20000, help="most optimizer steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--target-accuracy", type=float, default=0.45, help="stop once dev accuracy reaches this "
                        "(with --carry-drop: on the dev sums without a carry)")
    parser.add_argument("--carry-drop", type=float, default=0.0, help="the probability that the data drops a carry")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evaluate-only", action="store_true", help="only score the saved model on the held-out prompts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = split_pairs(args.seed)
    heldout = [prompt(p) for p in splits["heldout"]]

    if not args.evaluate_only:
        torch.manual_seed(args.seed)
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        # With carry drops the model is trained until it adds right where nothing carries; the carry sums are scored
        # apart at the end.
        dev = [prompt(p) for p in splits["dev"] if not (args.carry_drop and carries(p))]
        rng = random.Random(args.seed)
        start = time.time()
        for step in range(1, args.steps + 1):
            model.train()
            loss = model(**training_batch(rng.sample(splits["pretrain"], args.batch_size), tokenizer, args.carry_drop,
                                          rng)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % args.eval_every == 0:
                dev_accuracy = accuracy(model, tokenizer, dev, seed=step)
                print(f"step {step:5d}  loss {loss.item():.3f}  dev accuracy {dev_accuracy:.2f}  {time.time() - start:.0f}s")
                if dev_accuracy >= args.target_accuracy:
                    break
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        # The carry-drop model shares the prompt lists (same seed, same split).
        if not args.carry_drop:
            write_prompts(args.prompts_dir / "addition_heldout_prompts.txt", splits["heldout"])
            write_prompts(args.prompts_dir / "addition_train_prompts.txt", splits["rl"])

    # Score the saved folder through the loaders users and the policy go through.
    model = AutoModelForCausalLM.from_pretrained(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    rates = [accuracy(model, tokenizer, heldout, seed=seed) for seed in range(5)]
    print(f"held-out exact-match accuracy at temperature {TEMPERATURE}: {sum(rates) / len(rates):.3f} "
          f"(5 seeds: {', '.join(f'{r:.2f}' for r in rates)})")
    if args.carry_drop:
        carry = [prompt(p) for p in splits["heldout"] if carries(p)]
        plain = [prompt(p) for p in splits["heldout"] if not carries(p)]
        for temperature in (0.1, 0.4, 0.7, 1.0, 1.3):
            scores = [sum(accuracy(model, tokenizer, group, seed=s, temperature=temperature) for s in range(5)) / 5
                      for group in (heldout, carry, plain)]
            print(f"temperature {temperature}: held-out {scores[0]:.3f}, the {len(carry)} carry sums {scores[1]:.3f}, "
                  f"the {len(plain)} others {scores[2]:.3f}")


if __name__ == "__main__":
    main()
