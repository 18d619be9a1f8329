"""Text from a Samba model, from either head, decoding one token at a time in constant memory.

    python -m samba.generate MODEL_DIR --prompt TEXT [--max-new-tokens N] [--head main|readout]
                             [--temperature T] [--top-p P] [--seed S]

The prompt is read in one parallel pass (the prefill) that leaves each layer's conv window and
SSM state behind; every new token then costs one recurrent step per layer (``MambaMixer.step``:
mamba-ssm's ``causal_conv1d_update`` and ``selective_state_update`` kernels on CUDA, the same
recurrence in PyTorch on the CPU), with the chunk-output sparsity applied as in training. On
CUDA the step is replayed as a CUDA graph. ``--temperature 0`` decodes greedily.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .cuda_graphs import GraphedCallable, graphs_wanted
from .data import TOKENIZER_FILE, DataError, load_tokenizer
from .model import MixerState, Samba
from .config import ComputeConfig, ConfigError
from .model_files import require_model_dir
from .runtime import autocast, resolve_device

logger = logging.getLogger(__name__)
HEADS = ("main", "readout")


class Decoder:
    """Recurrent state of a batch of sequences, and the two ways forward: ``prefill`` (a whole
    prompt, in parallel) and ``step`` (one token each).

    A decoder can serve many generations of the same batch size (``generate(..., decoder=)``):
    each prefill overwrites the states, and the step's CUDA graph, captured once, is replayed
    on (mamba-ssm's ``generate(cg=True)`` keeps its graphs on the model the same way)."""

    def __init__(self, model: Samba, batch_size: int, head: str = "main", graphs: bool = False):
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.model, self.head, self.batch_size = model.eval(), head, batch_size
        device, dtype = model.embedding.weight.device, model.embedding.weight.dtype
        self.dtype = dtype if dtype != torch.float32 else None  # autocast for low-precision weights
        self.states: list[list[MixerState]] = [
            [layer.mixer.new_state(batch_size, device, dtype) for layer in chunk.layers] for chunk in model.chunks]
        self.step = GraphedCallable(self._step, enabled=graphs_wanted(graphs, device), warmup=2,
                                    name="decoding step")

    @torch.no_grad()
    def warm_up(self) -> None:
        """Run the step on placeholder tokens until it is captured (eager warm-up calls, then the
        capture; once on the CPU), so that what that logs (the mixer's path, the capture) comes
        before any text. The states it leaves are overwritten whole by the next prefill."""
        tokens = torch.zeros(self.batch_size, dtype=torch.long, device=self.model.embedding.weight.device)
        for _ in range(self.step.warmup + 1 if self.step.enabled else 1):
            self.step(tokens)

    def _logits(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        if self.head == "main":
            return F.linear(self.model.final_hidden(outputs), self.model.lm_head_weight).float()
        return self.model.readout(outputs).float()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) prompt -> next-token logits (B, V); the states now follow the prompt."""
        for chunk, states in zip(self.model.chunks, self.states):  # the weights may have changed since
            for layer, state in zip(chunk.layers, states):
                state.A.copy_(layer.mixer.decay())
        with autocast(input_ids.device, self.dtype, cache=False):
            outputs = self.model.chunk_outputs(input_ids, states=self.states)
            return self._logits([x[:, -1] for x in outputs])

    @torch.no_grad()
    def _step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B,) tokens -> next-token logits (B, V), advancing every state by one token."""
        with autocast(token_ids.device, self.dtype, cache=False):
            return self._logits(self.model.chunk_outputs(token_ids, states=self.states, step=True))


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Samba, input_ids: torch.Tensor, max_new_tokens: int, head: str = "main",
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, graphs: bool = True,
             on_token=None, decoder: Decoder | None = None) -> torch.Tensor:
    """(B, L) prompt -> (B, max_new_tokens) new tokens; ``on_token(tokens)`` sees each step's.

    ``decoder``: one made for this model, batch size and head, kept across calls so that its
    step is captured once (else a new one is made, and its graph freed at the end)."""
    own = decoder is None
    if own:
        decoder = Decoder(model, input_ids.shape[0], head, graphs)
    elif (decoder.model is not model or decoder.batch_size != input_ids.shape[0] or decoder.head != head):
        raise ValueError(f"the decoder was made for batch size {decoder.batch_size}, head {decoder.head!r} "
                         f"and {'this' if decoder.model is model else 'another'} model; this call has batch size "
                         f"{input_ids.shape[0]} and head {head!r}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    logits = decoder.prefill(input_ids)
    new = []
    for _ in range(max_new_tokens):
        tokens = sample(logits, temperature, top_p, generator)
        new.append(tokens)
        if on_token is not None:
            on_token(tokens)
        if len(new) < max_new_tokens:
            logits = decoder.step(tokens)
    if own:
        decoder.step.release()
    return torch.stack(new, dim=1) if new else input_ids.new_zeros(input_ids.shape[0], 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m samba.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a Samba model directory (it records its tokenizer)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--head", choices=HEADS, default="main")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory, if the model has none")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise DataError("--max-new-tokens and --temperature must be >= 0, --top-p in (0, 1]")
    model_dir = Path(args.model_dir)
    require_model_dir(model_dir, "train")
    tokenizer_path = args.tokenizer or model_dir / TOKENIZER_FILE
    if not Path(tokenizer_path).exists():
        raise DataError(f"{model_dir} records no tokenizer ({TOKENIZER_FILE}); pass --tokenizer "
                        "(models written by the train stage carry theirs)")
    tokenizer = load_tokenizer(str(tokenizer_path))
    try:  # refuses a bad name, or CUDA without a GPU
        device = resolve_device(ComputeConfig(device=args.device))
    except ConfigError as err:
        raise ConfigError(f"--device {args.device}: {str(err).split(': ', 1)[-1]}") from None
    model = Samba.from_pretrained(model_dir, device=device)
    if device.type == "cuda":
        model.to(torch.bfloat16)
    ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not ids:
        raise DataError("--prompt encodes to no tokens")
    prompt = torch.tensor([ids], device=device)
    produced: list[int] = []
    shown = ""

    def stream(tokens: torch.Tensor) -> None:
        nonlocal shown
        produced.append(int(tokens[0]))
        text = tokenizer.decode(produced)
        if not text.endswith("\ufffd"):  # a multi-byte character still incomplete
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    # The log (stderr) is complete before the first character of text (stdout), so that the two
    # never interleave on a terminal: the mixer's path and the step's capture are logged here.
    decoder = Decoder(model, 1, args.head, graphs=True)
    decoder.warm_up()
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    generate(model, prompt, args.max_new_tokens, args.head, args.temperature, args.top_p, args.seed,
             on_token=stream, decoder=decoder)
    sys.stdout.write(tokenizer.decode(produced)[len(shown):] + "\n")  # what an incomplete character held back


if __name__ == "__main__":
    # Run the package's copy of this module (samba.generate), not __main__'s: the errors the
    # command line turns into one line are the package's classes.
    from samba.cli import run_stage
    from samba.generate import main as package_main

    run_stage("generate", package_main)
