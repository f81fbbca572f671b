"""Fine-tuning a Llama: chat data with loss masks, LoRA written out, one training loop, DPO.

The pieces, in the order of notebook 05:

* `build_example` renders a conversation with the tokenizer's chat template and
  sets the labels to -100 everywhere except on the assistant's tokens, so the
  model learns to answer, not to repeat the question.
* `add_lora` freezes the model and wraps the chosen linear layers in
  `LoRALinear`: y = W x + (alpha / r) B A x, with A random and B zero, so training
  starts exactly where the base model is. `merge_lora` folds B A back into W.
* `train` is one loop for SFT and DPO, run through `accelerate` (one process in
  a notebook; several CPU processes or GPUs under `accelerate launch`).
* `dpo_loss` is Direct Preference Optimization (Rafailov et al., 2023).

From the command line (the same code, one or many processes)::

    python -m llama_lab.finetune --model tiny-random --steps 5
    accelerate launch --config_file configs/accelerate_cpu_2proc.yaml -m llama_lab.finetune --steps 5

>>> model, tokenizer = load_model("tiny-random")
>>> n_before = trainable_parameters(model)
>>> model = add_lora(model, r=8, alpha=16)
>>> n_before, trainable_parameters(model)  # 4 layers x (q: 8x(64+64) + v: 8x(64+32))
(218048, 7168)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Sequence
from itertools import count
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llama_lab import sizing
from llama_lab.chat import Messages, assistant_char_spans
from llama_lab.errors import InvalidSettingError
from llama_lab.models import load_model

DATA_DIR = Path(__file__).parent / "data"
IGNORE_INDEX = -100  # labels with this value are left out of the loss (PyTorch's cross_entropy default)


# --- data ---------------------------------------------------------------------------------------

def load_jsonl(name: str) -> list[dict]:
    """Rows of `llama_lab/data/<name>.jsonl` (or of a path to any JSONL file).

    >>> [m["role"] for m in load_jsonl("ft_people_train")[0]["messages"]]
    ['system', 'user', 'assistant']
    """
    path = Path(name) if name.endswith(".jsonl") else DATA_DIR / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_example(tokenizer, messages: Messages) -> dict[str, list[int]]:
    """Token ids of a chat and its labels: a copy of the ids, -100 outside the assistant's replies.

    >>> from llama_lab.models import tiny_tokenizer
    >>> tok = tiny_tokenizer()  # one token per byte
    >>> ex = build_example(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    >>> tok.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != IGNORE_INDEX])
    'Yo<|im_end|>'
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [t if any(s <= a and b <= e for s, e in spans) else IGNORE_INDEX
              for t, (a, b) in zip(ids, encoded["offset_mapping"], strict=True)]
    return {"input_ids": ids, "labels": labels}


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of `build_example` outputs into a batch (labels padded with -100)."""
    width = max(len(ex["input_ids"]) for ex in examples)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([ex[key] + [value] * (width - len(ex[key])) for ex in examples])

    ids = pad("input_ids", pad_id)
    mask = torch.tensor([[1] * len(ex["input_ids"]) + [0] * (width - len(ex["input_ids"]))
                         for ex in examples])
    return {"input_ids": ids, "attention_mask": mask, "labels": pad("labels", IGNORE_INDEX)}


def data_loader(examples: Sequence[dict], batch_size: int, collate_fn: Callable, seed: int = 0):
    """Shuffled batches, the same order for a given seed."""
    return torch.utils.data.DataLoader(list(examples), batch_size=batch_size, shuffle=True,
                                       collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))


# --- LoRA ---------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = W x + (alpha / r) B A x.

    A (r x in) starts random (Kaiming-uniform, as in peft), B (out x r) starts at zero,
    so at step 0 the layer computes exactly what the base layer computes.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / r
        weight = base.weight  # a 4-bit base (bitsandbytes) stores bytes: its adapter computes in bf16
        dtype = weight.dtype if weight.is_floating_point() else torch.bfloat16
        kw = dict(bias=False, device=weight.device, dtype=dtype)
        self.lora_A = nn.Linear(base.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale

    def merged(self) -> nn.Linear:
        """The base layer with the update folded in: W <- W + (alpha / r) B A (float weights only)."""
        with torch.no_grad():
            self.base.weight += self.scale * self.lora_B.weight @ self.lora_A.weight
        return self.base


def _replace_modules(model: nn.Module, pick: Callable[[str, nn.Module], nn.Module | None]) -> None:
    for name, module in list(model.named_modules()):
        new = pick(name, module)
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16,
             targets: Iterable[str] = ("q_proj", "v_proj")) -> nn.Module:
    """Freeze `model` and wrap in a `LoRALinear` every nn.Linear whose name ends with one of
    `targets` ("q_proj" picks all of them, "layers.29.self_attn.q_proj" one), as peft's
    `target_modules` does. Changes the model in place and returns it."""
    targets = tuple(targets)
    model.requires_grad_(False)
    _replace_modules(model, lambda name, m: LoRALinear(m, r, alpha) if isinstance(m, nn.Linear) and any(
        name == t or name.endswith("." + t) for t in targets) else None)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and remove the adapters (in place)."""
    _replace_modules(model, lambda name, m: m.merged() if isinstance(m, LoRALinear) else None)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Take every LoRA adapter off and put the untouched base layers back (peft's `unload()`), in place."""
    _replace_modules(model, lambda name, m: m.base if isinstance(m, LoRALinear) else None)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- memory of fine-tuning ----------------------------------------------------------------------

def finetune_memory(config, method: str = "full", r: int = 8, targets: Iterable[str] = ("q_proj", "v_proj"),
                    n_gpus: int = 1) -> dict[str, float]:
    """Bytes per GPU for model state when fine-tuning, activations not included.

    method: "full" (bf16 weights and gradients, fp32 master weights and two AdamW
    moments: 2 + 2 + 4 + 4 + 4 = 16 bytes per parameter), "lora" (frozen bf16
    weights; the adapter trained as in "full"), "qlora" (frozen NF4 weights).
    `n_gpus` > 1 shards everything evenly, as FSDP's FULL_SHARD does.

    >>> from llama_lab.sizing import llama2_config
    >>> full = finetune_memory(llama2_config("13b"), "full")
    >>> round(sum(full.values()) / 1e9)
    208
    """
    n = sizing.count_parameters(config)
    if method == "full":
        parts = {"weights": 2 * n, "gradients": 2 * n, "adamw (master + 2 moments)": 12 * n}
    elif method in ("lora", "qlora"):
        n_lora = trainable_parameters(add_lora(sizing.meta_model(config), r, r, targets))  # on "meta": free
        frozen = sizing.weight_bytes(config, "bf16" if method == "lora" else "nf4")
        parts = {"weights": frozen, "gradients": 2 * n_lora, "adamw (master + 2 moments)": 12 * n_lora}
    else:
        raise InvalidSettingError(f"method={method!r}: use 'full', 'lora' or 'qlora'")
    return {k: v / n_gpus for k, v in parts.items()}


# --- training -----------------------------------------------------------------------------------

def labelled_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict a labelled token, and those tokens: (n, vocab) and (n,), row after row.

    The logit at position t predicts token t + 1. Only the positions that predict a label go
    through the lm_head (`logits_to_keep` with a boolean mask): the logits of the prompt and the
    padding, most of a training step's memory with a 49,152-token vocabulary, are never made.
    """
    targets = batch["labels"][:, 1:]
    keep = F.pad(targets != IGNORE_INDEX, (0, 1))  # the last position predicts nothing
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=keep).logits
    return logits, targets[keep[:, :-1]]


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the next token over the labelled (assistant) positions: what
    `model(**batch).loss` computes, without the logits of the other positions."""
    return F.cross_entropy(*labelled_logits(model, batch))


def train(model: nn.Module, loader, loss_fn: Callable = sft_loss, *, steps: int, lr: float,
          accelerator=None, progress: bool = True,
          on_step: Callable[[int], None] | None = None) -> list[float]:
    """AdamW on the trainable parameters for `steps` batches (cycling over `loader`).

    Returns the loss of every step (averaged over processes); `on_step(step)`, if given, runs
    after each optimizer step (step 1, 2, ...), to evaluate on the side. Runs through
    `accelerate`: pass the `Accelerator` of a multi-process launch, or leave it
    None for a single process.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    wrapped.train()
    history = []
    bar = tqdm(range(steps), desc="training", disable=not (progress and accelerator.is_local_main_process))
    batches = (batch for _epoch in count() for batch in loader)  # epoch after epoch, reshuffled
    for step in bar:
        loss = loss_fn(wrapped, next(batches))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        history.append(accelerator.reduce(loss.detach(), "mean").item())
        bar.set_postfix(loss=f"{history[-1]:.3f}")
        if on_step is not None:
            on_step(step + 1)
    wrapped.eval()
    return history


# --- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def generate_replies(model: nn.Module, tokenizer, conversations: Sequence[Messages],
                     max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy replies to the user turns of each conversation (its assistant turns are dropped)."""
    prompts = [tokenizer.apply_chat_template([m for m in c if m["role"] != "assistant"], tokenize=False,
                                             add_generation_prompt=True) for c in conversations]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens line up at the right
    replies = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            replies += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return replies


def json_match(reply: str, expected: str) -> bool:
    """True when `reply` is valid JSON equal to `expected` (spacing and key order aside).

    >>> json_match('{"age": 3, "name": "Bo"}', '{"name": "Bo", "age": 3}'), json_match('Sure! {}', '{}')
    (True, False)
    """
    try:
        return json.loads(reply) == json.loads(expected)
    except json.JSONDecodeError:
        return False


def json_accuracy(model: nn.Module, tokenizer, rows: Sequence[dict],
                  max_new_tokens: int = 24) -> tuple[float, list[str]]:
    """Share of rows whose greedy reply is exactly the expected JSON, and the replies.
    (24 new tokens hold the longest answer of the ft_people files.)"""
    replies = generate_replies(model, tokenizer, [r["messages"] for r in rows], max_new_tokens)
    expected = [r["messages"][-1]["content"] for r in rows]
    return sum(map(json_match, replies, expected)) / len(rows), replies


# --- DPO ----------------------------------------------------------------------------------------

def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(reply | prompt) for each row: the sum of the log-probabilities of the labelled tokens."""
    token_logps = -F.cross_entropy(*labelled_logits(model, batch), reduction="none")
    rows = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]  # the row of each labelled token
    return token_logps.new_zeros(len(batch["labels"])).index_add(0, rows, token_logps)


def dpo_margin(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Implicit reward of the chosen reply minus that of the rejected one, where a reply's
    reward is beta x log(pi(y|x) / pi_ref(y|x))."""
    return beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO: -log sigmoid(margin), averaged over pairs. Inputs are sequence log-probabilities.

    >>> zero = torch.zeros(1)  # policy == reference: margin 0, loss log 2
    >>> round(dpo_loss(zero, zero, zero, zero).item(), 4)
    0.6931
    """
    return -F.logsigmoid(dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)).mean()


def preference_examples(tokenizer, pairs: Sequence[dict]) -> list[dict]:
    """`build_example` for the chosen and the rejected reply of each `{"prompt", "chosen", "rejected"}`."""
    def example(prompt: str, reply: str) -> dict:
        return build_example(tokenizer, [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": reply}])
    return [{"chosen": example(p["prompt"], p["chosen"]), "rejected": example(p["prompt"], p["rejected"])}
            for p in pairs]


def collate_pairs(pairs: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch holding every chosen reply, then every rejected one (one forward pass for both),
    with the reference log-probabilities when the pairs carry them."""
    batch = collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)
    if "ref" in pairs[0]:
        batch["ref"] = torch.stack([p["ref"] for p in pairs])  # (pairs, 2): chosen, rejected
    return batch


@torch.no_grad()
def add_reference_logprobs(model: nn.Module, pairs: list[dict], pad_id: int) -> list[dict]:
    """Store the frozen reference model's log-probabilities in each pair (computed once, before DPO)."""
    for pair in pairs:
        logps = sequence_logprobs(model, collate_pairs([pair], pad_id))
        pair["ref"] = logps
    return pairs


def _policy_and_reference(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    chosen, rejected = sequence_logprobs(model, batch).chunk(2)
    return chosen, rejected, batch["ref"][:, 0], batch["ref"][:, 1]


def dpo_margins(model: nn.Module, batch: dict[str, torch.Tensor], beta: float = 0.1) -> torch.Tensor:
    """The DPO margin of each pair of a `collate_pairs` batch."""
    return dpo_margin(*_policy_and_reference(model, batch), beta)


def _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
             beta: float) -> tuple[torch.Tensor, ...]:
    return beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def dpo_rewards(model: nn.Module, batch: dict[str, torch.Tensor],
                beta: float = 0.1) -> tuple[torch.Tensor, ...]:
    """The implicit rewards beta x log(pi(y|x) / pi_ref(y|x)) of the chosen and of the rejected reply
    of each pair of a `collate_pairs` batch (their difference is `dpo_margins`)."""
    return _rewards(*_policy_and_reference(model, batch), beta)


def reward_summary(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Mean chosen reward, rejected reward and margin: what TRL logs as rewards/chosen,
    rewards/rejected and rewards/margins."""
    return {"chosen": chosen.mean().item(), "rejected": rejected.mean().item(),
            "margin": (chosen - rejected).mean().item()}


def dpo_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], beta: float = 0.1,
                   log: list[dict] | None = None) -> torch.Tensor:
    """`dpo_loss` of a `collate_pairs` batch (a `loss_fn` for `train`). With `log`, the batch's
    `reward_summary` is appended to it at every call."""
    logps = _policy_and_reference(model, batch)
    if log is not None:
        log.append(reward_summary(*_rewards(*(x.detach() for x in logps), beta)))
    return dpo_loss(*logps, beta)


# --- command line -------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llama_lab.finetune",
        description="LoRA supervised fine-tuning on a chat JSONL file; run it alone or under "
                    "`accelerate launch` (several CPU processes, or GPUs with FSDP).")
    parser.add_argument("--model", default="tiny-random", help="a name known to llama_lab.load_model")
    parser.add_argument("--data", default="ft_people_train", help="a JSONL of {'messages': [...]} rows")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--quantize", choices=["nf4", "int8"], help="Llama 2 on a GPU: QLoRA")
    parser.add_argument("--output", help="file to save the trained LoRA weights to (torch.save)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="a progress bar while training (--no-progress: none, as in a stored notebook)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[float]:
    """Train as the arguments say; returns the loss history."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # several CPU processes: gloo
    set_seed(args.seed)  # the same LoRA init on every process
    model, tokenizer = load_model(args.model, device=str(accelerator.device), quantize=args.quantize)
    add_lora(model, args.r, args.alpha, args.targets)
    examples = [build_example(tokenizer, row["messages"]) for row in load_jsonl(args.data)]
    loader = data_loader(examples, args.batch_size, lambda b: collate(b, tokenizer.pad_token_id), args.seed)
    accelerator.print(f"{accelerator.num_processes} process(es), {len(examples)} examples, "
                      f"{trainable_parameters(model):,} trainable parameters")
    try:
        history = train(model, loader, steps=args.steps, lr=args.lr, accelerator=accelerator,
                        progress=args.progress)
        accelerator.print(f"loss: first {history[0]:.4f}, last {history[-1]:.4f}")
        if args.output:
            state = {k: v for k, v in accelerator.get_state_dict(model).items() if "lora_" in k}
            accelerator.save(state, args.output)
            accelerator.print(f"saved {len(state)} LoRA tensors to {args.output}")
    finally:
        # Leave the process group on purpose: a process that exits with gloo's threads still
        # running aborts with "terminate called without an active exception".
        accelerator.end_training()
    return history


if __name__ == "__main__":
    main()
