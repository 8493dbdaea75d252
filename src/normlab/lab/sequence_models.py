"""Small sequence models with a pluggable norm, for the lab's padding and architecture claims:
a token model (character window -> norm -> MLP) and a tiny causal Transformer, Pre-LN or
Post-LN. The masked norms are given the batch's ``lengths``; the others see padding."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab.lab.text import PAD

NORM_KINDS = ("layer", "batch", "batch-masked", "power-masked")
NORM_LABELS = {
    "layer": "LayerNorm",
    "batch": "BatchNorm (unmasked)",
    "batch-masked": "BatchNorm (masked)",
    "power-masked": "PowerNorm (masked)",
}
NORM_COLOURS = {
    "layer": "#1f77b4",
    "batch": "#d62728",
    "batch-masked": "#2ca02c",
    "power-masked": "#9467bd",
}


class SequenceNorm(nn.Module):
    """One norm over the feature axis of (batch, length, features): ``layer`` (LayerNorm),
    ``batch`` (BatchNorm(dim=-1), padding included in its statistics), ``batch-masked`` and
    ``power-masked`` (BatchNorm / PowerNorm over real tokens only, given ``lengths``)."""

    def __init__(self, kind: str, features: int, *, power_warmup: int = 10, affine: bool = True):
        super().__init__()
        if kind not in NORM_KINDS:
            raise ValueError(f"norm kind must be one of {NORM_KINDS}, got {kind!r}")
        self.kind = kind
        self.masked = kind.endswith("-masked")
        if kind == "layer":
            self.norm = normlab.LayerNorm(features, elementwise_affine=affine)
        elif kind.startswith("batch"):
            self.norm = normlab.BatchNorm(features, dim=-1, affine=affine)
        else:
            self.norm = normlab.PowerNorm(
                features, dim=-1, warmup_iters=power_warmup, affine=affine
            )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.norm(x, lengths=lengths) if self.masked else self.norm(x)


class TokenMLP(nn.Module):
    """Next-character model: the embeddings of the last ``context`` characters, mixed by a
    linear layer, then the norm, then an MLP to the vocabulary (Bengio et al. 2003 style)."""

    def __init__(
        self,
        vocab: int,
        norm_kind: str,
        *,
        context: int = 4,
        embed: int = 16,
        hidden: int = 64,
        power_warmup: int = 10,
    ):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.mix = nn.Linear(context * embed, hidden)
        self.norm = SequenceNorm(norm_kind, hidden, power_warmup=power_warmup)
        self.hidden = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, vocab)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the norm sees: (B, L, hidden); padding positions hold the mixing bias."""
        length = tokens.shape[1]
        windows = [F.pad(tokens, (k, 0), value=PAD)[:, :length] for k in range(self.context)]
        return self.mix(torch.cat([self.embed(w) for w in windows], dim=-1))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.norm(self.features(tokens), lengths))
        return self.out(F.gelu(self.hidden(h)))


class TransformerBlock(nn.Module):
    """Causal self-attention and a two-layer FFN, each a residual branch with a norm:
    Post-LN ``x = norm(x + f(x))`` (Vaswani et al., BERT) or Pre-LN ``x = x + f(norm(x))``."""

    def __init__(
        self, d_model: int, heads: int, ffn: int, norm_kind: str, pre_ln: bool, power_warmup: int
    ):
        super().__init__()
        self.heads, self.pre_ln = heads, pre_ln
        self.attn_norm = SequenceNorm(norm_kind, d_model, power_warmup=power_warmup)
        self.ffn_norm = SequenceNorm(norm_kind, d_model, power_warmup=power_warmup)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ffn_in = nn.Linear(d_model, ffn)
        self.ffn_out = nn.Linear(ffn, d_model)  # "W^{FFN,2}" of Xiong et al. 2020

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape
        q, k, v = (
            self.qkv(x)
            .view(batch, length, 3, self.heads, d_model // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        # Causal: with right padding, real positions never attend to padding.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, d_model))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_out(F.relu(self.ffn_in(x)))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attention(self.attn_norm(x, lengths))
            return x + self.ffn(self.ffn_norm(x, lengths))
        x = self.attn_norm(x + self.attention(x), lengths)
        return self.ffn_norm(x + self.ffn(x), lengths)


class TinyTransformer(nn.Module):
    """A causal character-level Transformer; Pre-LN adds a final norm before the output
    layer, Post-LN ends in its last block's norm. Linear weights Xavier-uniform, biases zero
    (the initialization Xiong et al. 2020 analyse)."""

    def __init__(
        self,
        vocab: int,
        norm_kind: str,
        *,
        pre_ln: bool,
        d_model: int = 32,
        heads: int = 2,
        layers: int = 2,
        ffn: int = 64,
        max_length: int = 64,
        power_warmup: int = 10,
    ):
        super().__init__()
        self.pre_ln = pre_ln
        self.embed = nn.Embedding(vocab, d_model, padding_idx=PAD)
        self.position = nn.Embedding(max_length, d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, heads, ffn, norm_kind, pre_ln, power_warmup)
            for _ in range(layers)
        )
        self.final_norm = (
            SequenceNorm(norm_kind, d_model, power_warmup=power_warmup) if pre_ln else None
        )
        self.out = nn.Linear(d_model, vocab)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():  # token + position have unit variance per entry
            self.embed.weight.mul_(1 / math.sqrt(2))
            self.embed.weight[PAD].zero_()
            self.position.weight.mul_(1 / math.sqrt(2))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x, lengths)
        if self.final_norm is not None:
            x = self.final_norm(x, lengths)
        return self.out(x)


def next_token_loss(
    logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, int, int]:
    """Mean cross-entropy of predicting token t+1 from position t over real pairs only;
    also the number of correct argmax predictions and of real pairs."""
    valid = normlab.lengths_to_mask(lengths - 1, tokens.shape[1] - 1)
    predictions, targets = logits[:, :-1][valid], tokens[:, 1:][valid]
    loss = F.cross_entropy(predictions, targets)
    correct = int((predictions.argmax(-1) == targets).sum())
    return loss, correct, int(valid.sum())


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Held-out loss (mean over real tokens) and accuracy, in eval mode (running statistics)."""
    was_training = model.training
    model.eval()
    total_loss, total_correct, total = 0.0, 0, 0
    for tokens, lengths in batches:
        loss, correct, count = next_token_loss(model(tokens, lengths), tokens, lengths)
        total_loss += float(loss) * count
        total_correct += correct
        total += count
    model.train(was_training)
    return {"loss": finite_or_none(total_loss / total), "accuracy": total_correct / total}


def finite_or_none(value: float) -> float | None:
    """A JSON-safe number: None for NaN or infinity."""
    return float(value) if math.isfinite(value) else None


def thin(
    values: list[float | None], points: int, every: int | None = None
) -> tuple[list[float | None], int]:
    """Means of consecutive blocks of ``every`` values so that at most ``points`` remain
    (None where a block holds no finite value); returns the means and ``every``. Keeps
    results.json small for long runs; the figures plot block means at their last step."""
    every = every or max(1, math.ceil(len(values) / points))
    means: list[float | None] = []
    for start in range(0, len(values), every):
        block = [v for v in values[start : start + every] if v is not None]
        means.append(sum(block) / len(block) if block else None)
    return means, every


@dataclass
class Curves:
    train_loss: list[float | None] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float | None] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)

    def as_dict(self, points: int = 500, max_steps: int | None = None) -> dict:
        """The curves; the per-step training loss as means of blocks of ``train_loss_every``
        steps, at most ``points`` of them (for ``max_steps`` steps, so that runs that stop
        early share the block size)."""
        every = max(1, math.ceil((max_steps or len(self.train_loss)) / points))
        train_loss, every = thin(self.train_loss, points, every)
        return {
            "train_loss": train_loss,
            "train_loss_every": every,
            "eval_steps": self.eval_steps,
            "eval_loss": self.eval_loss,
            "eval_accuracy": self.eval_accuracy,
        }


@dataclass(frozen=True)
class Schedule:
    """A training length and learning-rate schedule, fixed before the data: linear warmup
    over ``warmup`` steps to ``lr``, cosine decay to ``lr * floor`` at ``decay_end``, then
    constant; held-out evaluation every ``eval_every`` steps. With ``early_stop`` a run
    stops at the first evaluation at which its curve meets the regime criterion
    (``rules.stop_now``, its window wholly after ``decay_end``), else at ``max_steps``."""

    lr: float
    max_steps: int
    eval_every: int
    warmup: int = 0
    decay_end: int = 0
    floor: float = 1.0
    early_stop: bool = False

    def rate(self, step: int) -> float:
        """The learning rate at ``step`` (1-based), as a fraction of ``lr``."""
        if self.warmup and step <= self.warmup:
            return step / self.warmup
        if step >= self.decay_end or self.decay_end <= self.warmup:
            return self.floor if self.decay_end else 1.0
        progress = (step - self.warmup) / (self.decay_end - self.warmup)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))

    @property
    def constant_from(self) -> int:
        """The step from which the rate is constant (what the regime check needs)."""
        return max(self.warmup, self.decay_end)

    def describe(self) -> str:
        if not self.decay_end and not self.warmup:
            words = f"lr {self.lr:g} (constant)"
        else:
            words = (
                f"lr {self.lr:g} after a linear warmup of {self.warmup} steps, cosine decay to "
                f"{self.lr * self.floor:g} at step {self.decay_end}, constant after"
            )
        stop = (
            f"at most {self.max_steps} steps, stopping at the first evaluation (every "
            f"{self.eval_every} steps) at which the held-out curve meets the regime criterion"
            if self.early_stop
            else f"{self.max_steps} steps, held-out evaluation every {self.eval_every} steps"
        )
        return f"{words}; {stop}"

    def as_dict(self) -> dict:
        return {
            "lr": self.lr,
            "max_steps": self.max_steps,
            "eval_every": self.eval_every,
            "warmup": self.warmup,
            "decay_end": self.decay_end,
            "floor": self.floor,
            "early_stop": self.early_stop,
            "constant_from": self.constant_from,
        }


def padded_train_losses(runs: list[dict]) -> tuple[list[list[float]], int]:
    """The runs' thinned training losses as rows of equal length (NaN after a run that
    stopped early) and the steps per point (the same for every run of one schedule)."""
    longest = max(len(r["train_loss"]) for r in runs)
    rows = [
        [math.nan if v is None else v for v in r["train_loss"]]
        + [math.nan] * (longest - len(r["train_loss"]))
        for r in runs
    ]
    return rows, runs[0].get("train_loss_every", 1)


def train_next_token(
    model: nn.Module,
    draw_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    held_out: list[tuple[torch.Tensor, torch.Tensor]],
    schedule: Schedule,
) -> Curves:
    """Adam on the masked next-token loss under ``schedule``; held-out evaluation every
    ``eval_every`` steps and at the end. A non-finite training loss is recorded as None and
    training goes on."""
    from normlab.lab.rules import stop_now

    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr, foreach=True)
    curves = Curves()
    model.train()
    for step in range(1, schedule.max_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr * schedule.rate(step)
        tokens, lengths = draw_batch()
        loss, _, _ = next_token_loss(model(tokens, lengths), tokens, lengths)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        curves.train_loss.append(finite_or_none(float(loss.detach())))
        if step % schedule.eval_every == 0 or step == schedule.max_steps:
            result = evaluate(model, held_out)
            curves.eval_steps.append(step)
            curves.eval_loss.append(result["loss"])
            curves.eval_accuracy.append(result["accuracy"])
            if schedule.early_stop and stop_now(
                curves.eval_steps, curves.eval_loss, schedule.constant_from
            ):
                break
    return curves
