"""The training loop: paper Algorithm 1 with mini-batch anchoring (paper §8).

One outer iteration (a "step"):

1. rollout       the engine gets the current weights, samples G completions per prompt
2. rewards       reward functions score them (contained: a failing function gives None)
3. advantages    group z-scores (``opo_kernels.group_advantages``); DAPO filters groups
4. anchor        log-probs of every mini-batch under the current policy, no grad: π_ref = π_θ;
                 their mismatch with the engine's log-probs; the reference model's (beta > 0)
5. update        for each mini-batch: loss through the fused kernel against the frozen anchor,
                 backward, clip, optimizer step (Δ = 0 on the first mini-batch, ≠ 0 after)
6. log / validate / checkpoint

One :class:`Experience` carries a step's data through the steps (``rollout`` → ``score`` →
``advantages`` → ``minibatches`` → ``anchor_and_update`` → ``summarize``); ``_loop`` reads top to
bottom in named sections.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from opo_kernels.options import Agg, counts_read

from .config import LOSS_OPTION_KEYS, Config, load_config
from .errors import ConfigError, Interrupted, TrainingStopped
from .data import ToyTask, as_dataset, is_conversation, load_hf_rows, load_math
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, setup, teardown
from .metrics import (MetricsLogger, console_line, peak_memory_gb, quiet_third_party,
                      validation_line)
from .model import (build_policy, flash_attn_available, iter_full_params, load_tokenizer,
                    param_count, save_hf, trainable_params)
from .rewards import RewardRunner, resolve_rewards
from .rollout import Sample, make_engine

log = logging.getLogger("opo_train")


# ----------------------------------------------------------------------------------------------
# Sequences and batches
# ----------------------------------------------------------------------------------------------

@dataclass
class Seq:
    ids: list[int]        # prompt + completion token ids
    prompt_len: int
    advantage: float = 0.0
    valid: bool = True    # False: kept in the batch, left out of the loss (mask 0)
    rollout_logps: list[float] | None = None  # the rollout engine's log-probs of the completion


def collate(seqs: list[Seq], pad_id: int, device, packed: bool) -> dict:
    """Sequences -> model inputs. ``targets[t]`` is the token after position t; ``mask`` marks
    the positions whose target is a completion token of a valid sequence.

    Padded: input_ids / attention_mask / targets / mask (B, T). Packed (padding-free, for
    flash-attn): input_ids / position_ids (1, N), targets / mask (N,), cu_seqlens (B+1,) int32.
    Also ``advantages`` (B,) fp32 and ``num_tokens`` (non-pad tokens), and when the sequences
    carry them ``rollout_logps`` (like ``targets``, fp32): the engine's log-prob of each
    completion token at the position that predicts it, 0 elsewhere.
    """
    adv = torch.tensor([s.advantage for s in seqs], dtype=torch.float32)
    with_rollout = any(s.rollout_logps is not None for s in seqs)

    def rollout_row(s: Seq, n: int) -> list[float]:
        if not s.valid:  # takes no part: nothing of it (NaN included) reaches the loss
            return [0.0] * n
        c = n - s.prompt_len
        lp = list(s.rollout_logps or [])[:c]
        return [0.0] * (s.prompt_len - 1) + lp + [0.0] * (c - len(lp)) + [0.0]

    if packed:
        ids, pos, tgt, msk, rlp, cu = [], [], [], [], [], [0]
        for s in seqs:
            n = len(s.ids)
            ids += s.ids
            pos += list(range(n))
            tgt += s.ids[1:] + [-100]
            msk += [s.valid and s.prompt_len - 1 <= t < n - 1 for t in range(n)]
            if with_rollout:
                rlp += rollout_row(s, n)
            cu.append(cu[-1] + n)
        b = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]),
             "targets": torch.tensor(tgt), "mask": torch.tensor(msk),
             "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
        if with_rollout:
            b["rollout_logps"] = torch.tensor(rlp, dtype=torch.float32)
    else:
        T = max(len(s.ids) for s in seqs)
        B = len(seqs)
        b = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((B, T), dtype=torch.long),
             "targets": torch.full((B, T), -100, dtype=torch.long),
             "mask": torch.zeros((B, T), dtype=torch.bool)}
        if with_rollout:
            b["rollout_logps"] = torch.zeros((B, T), dtype=torch.float32)
        for i, s in enumerate(seqs):
            n = len(s.ids)
            b["input_ids"][i, :n] = torch.tensor(s.ids)
            b["attention_mask"][i, :n] = 1
            b["targets"][i, :n - 1] = torch.tensor(s.ids[1:])
            if s.valid:
                b["mask"][i, s.prompt_len - 1:n - 1] = True
            if with_rollout:
                b["rollout_logps"][i, :n] = torch.tensor(rollout_row(s, n))
    out = {k: v.to(device) for k, v in b.items()}
    out["advantages"] = adv.to(device)
    out["num_tokens"] = sum(len(s.ids) for s in seqs)
    return out


def dummy_seqs(pad_id: int, n: int) -> list[Seq]:
    """Stand-ins for a rank whose share of a mini-batch is empty (e.g. after DAPO filtering):
    every rank must run the same number of FSDP forwards; these contribute nothing (mask 0)."""
    return [Seq([pad_id, pad_id], 1, 0.0, False) for _ in range(n)]


def rank_share(n_items: int, minibatches: int, world: int, rank: int) -> list[list[int]]:
    """Indices of this rank's items, per mini-batch. Global mini-batch k is the k-th contiguous
    slice of the items, split contiguously over ranks: the mini-batches are the same sets
    whatever the number of ranks (so 1 and N processes compute the same updates)."""
    out = []
    for k in range(minibatches):
        lo, hi = k * n_items // minibatches, (k + 1) * n_items // minibatches
        a, b = lo + (hi - lo) * rank // world, lo + (hi - lo) * (rank + 1) // world
        out.append(list(range(a, b)))
    return out


# ----------------------------------------------------------------------------------------------
# Loss options, advantages
# ----------------------------------------------------------------------------------------------

def loss_kwargs(cfg: Config, info: DistInfo) -> dict:
    kw = {k: getattr(cfg, k) for k in LOSS_OPTION_KEYS}
    kw["max_completion_length"] = cfg.max_new_tokens
    # ω is normalized over the data-parallel group (every rank's sequences of the mini-batch).
    kw["process_group"] = info.group if info.world > 1 else None
    return kw


def loss_count(cfg: Config, metrics: dict, n_seqs_local: int) -> float:
    """What the kernel's loss is a mean over, on this rank (to weight ranks exactly)."""
    agg = cfg.loss_options().kind.aggregate
    if agg is Agg.MAX_LENGTH:
        return float(n_seqs_local)
    if agg is Agg.TOKEN_MEAN:
        return float(metrics["num_tokens"])
    if agg is Agg.GROUP_MEAN:
        return float(metrics["num_seqs"]) / cfg.group_size
    return float(metrics["num_seqs"])


def global_counts(b: dict, info: DistInfo) -> tuple[float, float, float]:
    """The mini-batch's valid tokens, sequences with a valid token, and rows, over every rank."""
    m = b["mask"]
    if "cu_seqlens" in b:
        cu = b["cu_seqlens"].long()
        csum = torch.cat([m.new_zeros(1, dtype=torch.long), m.long().cumsum(0)])
        per_seq = csum[cu[1:]] - csum[cu[:-1]]
    else:
        per_seq = m.long().sum(-1)
    n_tok, n_seq, n_rows = all_reduce_sum([float(m.sum()), float((per_seq > 0).sum()),
                                           float(b["advantages"].shape[0])], info)
    return n_tok, n_seq, n_rows


def compute_advantages(rewards: list[float | None], G: int, scale: str) -> list[float]:
    """``group_advantages`` over groups of G; samples whose reward is None get advantage 0 and
    the group statistics use the other members only."""
    import opo_kernels as ok
    if all(r is not None for r in rewards):
        return ok.group_advantages(torch.tensor(rewards, dtype=torch.float64), G, scale=scale).tolist()
    adv = [0.0] * len(rewards)
    centered = []
    for g in range(len(rewards) // G):
        idx = [i for i in range(g * G, g * G + G) if rewards[i] is not None]
        if len(idx) < 2:
            continue
        r = torch.tensor([rewards[i] for i in idx], dtype=torch.float64)
        a = ok.group_advantages(r, len(idx), scale="group" if scale == "group" else "none").tolist()
        centered += [(i, v) for i, v in zip(idx, a)]
    if scale == "batch" and centered:
        valid = torch.tensor([r for r in rewards if r is not None], dtype=torch.float64)
        std = float(valid.std()) if valid.numel() > 1 else 0.0
        centered = [(i, v / (std + 1e-6)) for i, v in centered]
    for i, v in centered:
        adv[i] = v
    return adv


def overlong_penalty(length: int, cfg: Config) -> float:
    """DAPO soft overlong punishment: 0 up to L_max − buffer, then linear down to −penalty."""
    buf = cfg.effective_overlong_buffer()
    if buf <= 0 or length <= cfg.max_new_tokens - buf:
        return 0.0
    return max(-1.0, ((cfg.max_new_tokens - buf) - length) / buf) * cfg.overlong_penalty


# ----------------------------------------------------------------------------------------------
# Anchor and update (steps 4 and 5)
# ----------------------------------------------------------------------------------------------

def anchor_logprobs(policy, batches: list[dict], cfg: Config) -> list[torch.Tensor]:
    """π_ref = π_θ: log-probs of every mini-batch before the first optimizer step, frozen for
    the whole outer iteration. Same tensors and kernel as the training pass, so Δ = 0 exactly
    on the first mini-batch."""
    out = []
    with torch.no_grad():
        for b in batches:
            logp, _ = policy(b, mode="logprobs", impl=cfg.loss_impl, backend=cfg.kernel_backend,
                             temperature=cfg.temperature)
            out.append(logp.detach())
    # FSDP2 leaves the root's parameters unsharded after a forward (expecting a backward to
    # reshard them); after a no-grad forward nothing would, and the next forward would reuse
    # that copy even after an optimizer step has changed the shards. Reshard explicitly.
    reshard(policy)
    return out


def reference_logprobs(ref, batches: list[dict], cfg: Config) -> list[torch.Tensor]:
    """Log-probs of every mini-batch under the frozen reference model (``beta`` > 0), through
    ``opo_kernels.linear_logprobs`` under no_grad, at the sampling temperature (as TRL)."""
    out = []
    with torch.no_grad():
        for b in batches:
            logp, _ = ref(b, mode="logprobs", impl=cfg.loss_impl, backend=cfg.kernel_backend,
                          temperature=cfg.temperature)
            out.append(logp.detach().float())
    return out


def rollout_mismatch(batches: list[dict], anchors: list[torch.Tensor], info: DistInfo) -> dict:
    """How far the rollout engine's log-probs are from the trainer's anchor log-probs, over the
    valid tokens of the step (every rank): mean k1 = E[log π_rollout − log π_anchor] and mean
    k3 = E[r − 1 − log r], r = π_anchor / π_rollout (both estimate KL(π_rollout ‖ π_anchor)
    from the rollout's samples), and the largest |log-ratio|. Computed in float64 here, whatever
    the loss reports."""
    k1 = k3 = n = 0.0
    worst = 0.0
    for b, old in zip(batches, anchors):
        if "rollout_logps" not in b:
            continue
        m = b["mask"].reshape(-1)
        d = (old.reshape(-1).double() - b["rollout_logps"].reshape(-1).double())[m]
        k1 += float((-d).sum())
        k3 += float((torch.exp(d) - d - 1.0).sum())
        n += float(m.sum())
        if d.numel():
            worst = max(worst, float(d.abs().max()))
    k1, k3, n = all_reduce_sum([k1, k3, n], info)
    worst = max(all_gather_objects(worst, info))
    if n == 0:
        return {}
    return {"mismatch_k1": k1 / n, "mismatch_k3": k3 / n, "mismatch_max_abs": worst}


def reshard(policy) -> None:
    if hasattr(policy, "reshard"):
        policy.reshard()


def grad_norm_and_clip(policy, max_norm: float) -> float:
    if getattr(getattr(policy, "head", None), "vocab_parallel", None) is not None:
        return _split_grad_norm_and_clip(policy, max_norm)
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _split_grad_norm_and_clip(policy, max_norm: float) -> float:
    """``clip_grad_norm_`` for a policy whose parameters live on two meshes (the decoder's FSDP
    shards over every process, the vocabulary-split head's on the (dp, tp) mesh), which torch's
    cannot stack: each rank's squared local gradients, divided by how many ranks hold the same
    copy (the mesh dimensions a tensor is replicated over), summed over every process in one
    all-reduce (float64)."""
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64)
    for g in grads:
        copies = math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements)
                           if pl.is_replicate())
        sq += g.to_local().detach().double().pow(2).sum().cpu() / copies
    if torch.distributed.get_backend() != "gloo":
        sq = sq.to(grads[0].device if grads else "cuda")
    torch.distributed.all_reduce(sq)
    norm = float(sq.sqrt())
    coef = max_norm / (norm + 1e-6)  # torch's clip_grad_norm_ rule
    if max_norm > 0 and coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm


def update_policy(policy, optimizer, batches: list[dict], anchors: list[torch.Tensor], cfg: Config,
                  info: DistInfo, lr: float, grad_hook=None, refs: list | None = None) -> list[dict]:
    """Step 5: one optimizer step per mini-batch (``ppo_epochs`` passes), anchor frozen.

    ``refs``: the reference model's log-probs per mini-batch (``beta`` > 0); the rollout
    engine's log-probs (``b["rollout_logps"]``) go to the loss when ``is_correction`` is set.

    Several ranks: each rank's loss divides its own sums by the mini-batch's global counts
    (``num_items_in_batch`` tokens, ``num_seqs_in_batch`` sequences), so every term — the policy
    term, and the KL and entropy token means that ride along a per-sequence loss — is its share
    of the whole mini-batch's mean, and ``world ×`` undoes FSDP's gradient average.
    ``escort="group_softmax"`` takes no global counts (its weights need whole groups): its
    per-rank mean is reweighted by ``count_local · world / count_global`` instead. Returns one
    dict per optimizer step with the global loss, grad norm and the kernel's metrics (local).
    """
    kw = loss_kwargs(cfg, info)
    reads_items, reads_seqs = counts_read(cfg.loss_options())
    per_row = cfg.loss_options().kind.aggregate is Agg.MAX_LENGTH  # B · max_completion_length
    use_global = info.world > 1 and (reads_items or reads_seqs)
    for g in optimizer.param_groups:
        g["lr"] = lr
    stats = []
    for epoch in range(cfg.ppo_epochs):
        for k, (b, old) in enumerate(zip(batches, anchors)):
            t0 = time.perf_counter()
            extra = dict(kw)
            if cfg.is_correction is not None:
                if "rollout_logps" not in b:
                    raise ConfigError("config key 'is_correction': the rollout engine returned no "
                                      "log-probs for the sampled tokens")
                extra["rollout_logps"] = b["rollout_logps"]
            if cfg.beta > 0:
                extra["ref_logps"] = refs[k]
            if use_global:
                n_tok, n_seq, n_rows = global_counts(b, info)
                if reads_items:
                    extra["num_items_in_batch"] = n_tok
                if reads_seqs:
                    extra["num_seqs_in_batch"] = n_rows if per_row else n_seq
            loss, m = policy(b, mode="loss", advantages=b["advantages"], old_logps=old,
                             loss_kwargs=extra, impl=cfg.loss_impl, backend=cfg.kernel_backend,
                             temperature=cfg.temperature)
            m = {key: float(v) for key, v in m.items()}
            count = loss_count(cfg, m, b["advantages"].shape[0])  # weights the metrics
            if use_global:
                total_count, loss_sum = all_reduce_sum([count, float(loss.detach())], info)
                (loss * info.world).backward()
                loss_sum *= total_count  # (divided again below)
            else:
                total_count, loss_sum = all_reduce_sum([count, float(loss.detach()) * count], info)
                scale = count * info.world / total_count if total_count > 0 else 0.0
                (loss * scale).backward()
            if grad_hook is not None:
                grad_hook(epoch, k, policy)
            gnorm = grad_norm_and_clip(policy, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            m.update(loss=loss_sum / total_count if total_count > 0 else 0.0, grad_norm=gnorm,
                     count=count, time=time.perf_counter() - t0, tokens=b["num_tokens"],
                     epoch=epoch, minibatch=k)
            stats.append(m)
    return stats


# ----------------------------------------------------------------------------------------------
# Prompts, rollout, validation
# ----------------------------------------------------------------------------------------------

def format_prompts(rows: list[dict], tok, cfg: Config, limit: int | None = None,
                   counts: dict | None = None) -> list[list[int]]:
    """Prompt token ids. A conversational prompt (a list of messages) always goes through the
    chat template; a string prompt does when ``chat_template`` is true, or auto and the tokenizer
    has one (as a single user message). ``chat_template`` may also be a Jinja template.

    A prompt longer than ``limit`` tokens (default ``max_prompt_length``) raises
    :class:`ConfigError` (``truncate=error``) or is cut on the ``truncate`` side, counted in
    ``counts["truncated"]``."""
    limit = limit or cfg.max_prompt_length
    custom = cfg.chat_template if cfg.chat_template not in ("auto", "true", "false") else None
    has_template = bool(custom or getattr(tok, "chat_template", None))
    wrap_strings = cfg.chat_template == "true" or custom is not None or (
        cfg.chat_template == "auto" and has_template)
    out = []
    for r in rows:
        msgs = r["prompt"] if is_conversation(r["prompt"]) else (
            [{"role": "user", "content": r["prompt"]}] if wrap_strings else None)
        if msgs is not None:
            if not has_template:
                raise ConfigError("config key 'chat_template': conversational prompts need a chat "
                                  "template and the tokenizer has none; set chat_template to a "
                                  "Jinja template")
            kw = dict(cfg.chat_template_kwargs)
            if custom:
                kw["chat_template"] = custom
            ids = tok.apply_chat_template(list(msgs), add_generation_prompt=True, tokenize=True, **kw)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        ids = list(ids)
        if len(ids) > limit:
            if cfg.truncate == "error":
                text = " ".join(str(r["prompt"]).split())
                raise ConfigError(
                    f"config key 'max_prompt_length': a prompt has {len(ids)} tokens, more than "
                    f"the {limit} the run takes ({text[:60]!r}...); raise max_prompt_length (up to "
                    f"the model's positions less max_new_tokens), shorten the prompts, or set "
                    f"truncate=left or truncate=right to cut them")
            ids = ids[-limit:] if cfg.truncate == "left" else ids[:limit]
            if counts is not None:
                counts["truncated"] = counts.get("truncated", 0) + 1
        out.append(ids)
    return out


def as_completions(rows: list[dict], texts: list[str]) -> list:
    """What reward functions get, as in TRL: the text, or for a conversational prompt the list
    ``[{"role": "assistant", "content": text}]``."""
    return [[{"role": "assistant", "content": t}] if is_conversation(r["prompt"]) else t
            for r, t in zip(rows, texts)]


def step_seed(cfg: Config, step: int, rank: int, salt: int = 0) -> int:
    return (cfg.seed * 1_000_003 + step * 1009 + rank * 17 + salt) % (2**31 - 1)


def validate(engine, rows: list[dict], tok, runner: RewardRunner, cfg: Config, info: DistInfo,
             step: int, limit: int | None = None) -> dict:
    """Greedy decoding on this process's share of the validation rows (split over every
    process, tensor-parallel ranks included); accuracy = reward >= 1."""
    r, n = info.global_rank, info.procs
    share = rows[r * len(rows) // n:(r + 1) * len(rows) // n]
    hits = total = reward_sum = 0.0
    if share:
        samples = engine.generate(format_prompts(share, tok, cfg, limit), 1, seed=step_seed(cfg, step, r, 7),
                                  greedy=True)
        comps = as_completions(share, [tok.decode(g[0].tokens, skip_special_tokens=True) for g in samples])
        cols = {k: [r.get(k) for r in share] for k in share[0] if k != "prompt"}
        rewards = runner([r["prompt"] for r in share], comps, cols,
                         [list(g[0].tokens) for g in samples])
        for r in rewards:
            total += 1
            reward_sum += r or 0.0
            hits += (r is not None and r >= 1.0 - 1e-9)
    hits, total, reward_sum = all_reduce_sum([hits, total, reward_sum], info, every_process=True)
    return {"val_accuracy": hits / max(total, 1), "val_reward": reward_sum / max(total, 1)}


# ----------------------------------------------------------------------------------------------
# Supervised warm start (its own phase)
# ----------------------------------------------------------------------------------------------

def warm_start(policy, tok, cfg: Config, info: DistInfo, packed: bool, output_dir: Path) -> list[dict]:
    """Cross-entropy on the answers of the toy task's ``sft`` split (disjoint from the RL and
    validation splits), through the same fused log-prob kernel. Logged to sft_metrics.jsonl."""
    task = ToyTask(cfg.seed, "sft", cfg.toy_digits, cfg.toy_task)
    opt = torch.optim.AdamW(trainable_params(policy), lr=cfg.sft_lr, betas=(0.9, 0.98))
    logger = MetricsLogger(output_dir, info.is_main, filename="sft_metrics.jsonl", tag_prefix="sft/",
                           tensorboard=cfg.tensorboard and "tensorboard" in cfg.report_to)
    t0 = time.time()
    for k in range(cfg.sft_steps):
        rows = task.batch(k, cfg.sft_batch_size)
        lo, hi = info.rank * len(rows) // info.world, (info.rank + 1) * len(rows) // info.world
        seqs = []
        for r in rows[lo:hi]:
            p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            a = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(Seq(p + a, len(p)))
        b = collate(seqs, tok.pad_token_id, info.device, packed)
        logp, _ = policy(b, mode="logprobs", impl=cfg.loss_impl, backend=cfg.kernel_backend)
        n_local = float(b["mask"].sum())
        n_total, = all_reduce_sum([n_local], info)
        # Sum over local tokens / global count, times world (FSDP averages gradients).
        loss = -(logp * b["mask"]).sum() / n_total * info.world
        loss.backward()
        grad_norm_and_clip(policy, 1.0)
        lr = cfg.sft_lr * min(1.0, (k + 1) / 20) * (0.5 + 0.5 * math.cos(math.pi * k / cfg.sft_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (k + 1) % 10 == 0 or k + 1 == cfg.sft_steps:
            nll, = all_reduce_sum([float(loss.detach()) / info.world], info)
            row = {"phase": "sft", "step": k + 1, "sft_loss": nll, "lr": lr,
                   "elapsed": time.time() - t0}
            logger.log(row, console=f"[warm start] step {k + 1:>4}/{cfg.sft_steps}  "
                                    f"token NLL {nll:.3f}  t {row['elapsed']:.0f}s")
    logger.close()
    return logger.rows


# ----------------------------------------------------------------------------------------------
# Signals: SIGINT / SIGTERM stop after the step in flight and save it; nothing outlives the run
# ----------------------------------------------------------------------------------------------

_WATCHING = False  # this process watches its launcher (once, whatever the number of runs)


class StopOnSignal:
    """SIGINT and SIGTERM ask the run to stop. During RL the first signal lets the step in flight
    finish (its checkpoint is then saved); the same signal again, or one outside the RL steps,
    stops at once, keeping the newest checkpoint on disk. Either way :class:`Interrupted` ends the run and
    says what holds it. Under torchrun a rank whose launcher disappears (``kill -9`` on
    torchrun) kills itself, so no rank is left waiting on its peers."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.signum = None
        self.in_steps = False
        self.old = {}

    def __enter__(self):
        import os
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        global _WATCHING
        if ("TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ) and not _WATCHING:
            from .rewards import watch_parent
            watch_parent(os.getppid())  # the launcher: gone means this rank is orphaned
            _WATCHING = True
        return self

    def __exit__(self, *exc):
        import signal
        for sig, old in self.old.items():
            signal.signal(sig, old)
        return False

    def _handle(self, signum, frame):
        import signal
        # Only the same signal again stops at once: on Ctrl-C under torchrun every rank gets
        # SIGINT from the terminal and then SIGTERM from torchrun, and should still save.
        if self.in_steps and self.signum in (None, *{signal.SIGINT, signal.SIGTERM} - {signum}):
            if self.signum is None and self.info.is_main:
                print(f"opo-train: {signal.Signals(signum).name}: stopping when this step ends "
                      f"and saving it (send it again to stop at once)", flush=True)
            self.signum = self.signum or signum
            return
        self.signum = signum
        raise Interrupted("", signum)

    def requested(self) -> bool:
        """Collective: whether any rank was asked to stop (all ranks then stop together)."""
        import signal
        flag, = all_reduce_sum([1.0 if self.signum is not None else 0.0], self.info,
                               every_process=True)
        if flag > 0 and self.signum is None:  # another rank's signal: stop alike
            self.signum = signal.SIGTERM
        return flag > 0


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it, or what it wraps) is ENOSPC."""
    import errno
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def resume_hint(cfg: Config, info: DistInfo) -> str:
    launch = (f"torchrun --nproc_per_node {info.procs} -m opo_train" if info.procs > 1
              else "opo-train")
    return f"{launch} --config {Path(cfg.output_dir) / 'config.yaml'} resume=true"


def interrupted(cfg: Config, info: DistInfo, signum: int, saved: Path | None) -> Interrupted:
    import signal
    name = signal.Signals(signum).name
    kept = saved or ckpt.latest(cfg.output_dir)
    if kept is None:
        again = " with overwrite=true" if ckpt.existing_run(cfg.output_dir) else ""
        return Interrupted(f"{name} before the first checkpoint: nothing was saved; start the run "
                           f"again{again}", signum)
    what = "saved" if saved is not None else "the newest checkpoint is"
    return Interrupted(f"{name}: {what} {kept} (step {ckpt.step_of(kept)}); resume with: "
                       f"{resume_hint(cfg, info)}", signum)


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------

def _default_data(cfg: Config):
    if cfg.task == "toy":
        val = ToyTask(cfg.seed, "val", cfg.toy_digits, cfg.toy_task).fixed(cfg.val_size or 64)
        return ToyTask(cfg.seed, "train", cfg.toy_digits, cfg.toy_task), val
    if cfg.task == "hf":
        val = load_hf_rows(cfg.val_file)[:cfg.val_size or None] if cfg.val_file else None
        return as_dataset(load_hf_rows(cfg.train_file), seed=cfg.data_seed, name=cfg.train_file), val
    train_rows = load_math(cfg.train_file, levels=cfg.train_levels, fraction=cfg.train_fraction,
                           seed=cfg.data_seed, prompt_suffix=cfg.prompt_suffix)
    val_rows = None
    if cfg.val_file:
        val_rows = load_math(cfg.val_file, levels=cfg.val_levels, size=cfg.val_size,
                             seed=cfg.data_seed, prompt_suffix=cfg.prompt_suffix)
    return as_dataset(train_rows, seed=cfg.data_seed, name=cfg.train_file), val_rows


def train(config: Config | str | dict | None = None, reward_fns=None, dataset=None,
          val_dataset=None, reward_weights=None) -> dict:
    """Run a training job; returns a summary dict (also the last metrics row).

    config: a :class:`Config`, a YAML path / shipped config name, a dict of overrides on the toy
        default, or None (the toy default).
    reward_fns: a callable or list of callables ``f(prompts, completions, **columns) ->
        list[float | None]``; default: the task's reward (``rewards`` config key).
    dataset: a list of row dicts (each with a ``prompt`` plus the columns the rewards read) or
        any object with ``batch(step, n)``; default: the config's task / train_file.
    val_dataset: a list of row dicts for validation (``val_every``).
    reward_weights: one weight per reward function (the ``reward_weights`` config key).
    """
    if config is None or isinstance(config, dict):
        cfg = load_config(None, config or {})
    elif isinstance(config, (str, Path)):
        cfg = load_config(str(config))
    elif isinstance(config, Config):
        cfg = config  # checked with everything else in preflight
    else:
        raise TypeError(f"config must be a Config, a path or a dict, got {type(config).__name__}")
    if reward_weights is not None:
        import dataclasses
        from .config import apply
        cfg = apply(dataclasses.replace(cfg), {"reward_weights": list(reward_weights)})
    with quiet_third_party():
        train_data, val_rows, fns, limit = preflight(cfg, reward_fns, dataset, val_dataset)
        info = setup(cfg.device, cfg.tensor_parallel_size)
        threads = torch.get_num_threads()
        if info.device.type == "cpu" and cfg.cpu_threads:
            # Tiny models gain nothing from intra-op threads, and on a shared machine OpenMP
            # threads that wait for a busy core slow every op down by an order of magnitude.
            torch.set_num_threads(cfg.cpu_threads)
        try:
            with StopOnSignal(info) as stop:
                try:
                    return _run(cfg, info, fns, train_data, val_rows, limit, stop)
                except Interrupted as e:
                    if str(e):
                        raise
                    raise interrupted(cfg, info, e.signum, None) from None
                except BaseException as e:  # noqa: BLE001 - DCP wraps OSErrors in a BaseException
                    if not _disk_full(e):
                        raise
                    kept = ckpt.latest(cfg.output_dir)
                    raise TrainingStopped(
                        f"no space left on the device of output_dir {cfg.output_dir!r}: free space "
                        f"(or use another output_dir) and resume; the newest complete checkpoint "
                        f"is {kept if kept else 'none'} (a checkpoint is renamed into place "
                        f"only once fully written)") from None
        finally:
            torch.set_num_threads(threads)
            teardown(info)


@dataclass
class Experience:
    """One outer iteration's data, carried from rollout to metrics.

    Per-sample lists (``raw_rewards``, ``rewards``, ``lengths``, ``truncated``, ``advantages``)
    are global: index ``group * G + sample`` over the step's P prompts, the same on every rank
    (group advantages and DAPO's filter need every reward). Token-level data are held for this
    rank's groups only, keyed by the global group index.
    """
    step: int                                    # 0-based outer iteration
    lr: float
    rows: list[dict]                             # the step's P prompt rows
    share: list[list[int]]                       # this rank's groups, per mini-batch
    prompt_ids: dict[int, list[int]] = field(default_factory=dict)
    samples: dict[int, list[Sample]] = field(default_factory=dict)       # G completions per group
    #                         (tokens, truncated, the engine's log-probs of the sampled tokens)
    completions: dict[int, list[str]] = field(default_factory=dict)      # decoded
    raw_rewards: list = field(default_factory=list)   # from the reward functions (None: no reward)
    rewards: list = field(default_factory=list)       # after shaping (DAPO's overlong penalty)
    lengths: list = field(default_factory=list)
    truncated: list = field(default_factory=list)
    fn_rewards: list = field(default_factory=list)    # per sample: each reward function's value
    advantages: list = field(default_factory=list)
    keep: list = field(default_factory=list)          # per group: takes part in the update
    batches: list = field(default_factory=list)       # this rank's mini-batches (model inputs)
    anchors: list = field(default_factory=list)       # their log-probs under π_θ at rollout time
    refs: list = field(default_factory=list)          # ... under the reference model (beta > 0)
    mismatch: dict = field(default_factory=dict)      # rollout log-probs vs anchor (k1, k3 KL)
    stats: list = field(default_factory=list)         # one dict per optimizer step
    times: dict = field(default_factory=dict)
    gen_tokens: int = 0                               # generated on this rank
    prompts_truncated: int = 0                        # ... prompts cut to the limit (truncate=)
    rounds: int = 0                                   # DAPO dynamic sampling: rounds sampled
    kept_first: int = 0                               # groups kept in the first round

    @property
    def groups(self) -> list[int]:
        return [g for mb in self.share for g in mb]


@dataclass
class Run:
    """What a run is made of (built once by :func:`_setup`)."""
    cfg: Config
    info: DistInfo
    tok: object
    policy: object
    optimizer: object
    engine: object
    runner: RewardRunner
    train_data: object
    val_rows: list | None
    max_steps: int
    packed: bool
    out_dir: Path
    prompt_limit: int   # the longest prompt in tokens (see check_prompts)
    weights: dict = field(default_factory=lambda: {"policy": 0, "engine": -1})
    ref: object = None   # frozen reference model (beta > 0), built when RL starts

    def sync_engine(self) -> None:
        """The engine samples with the policy's weights of the moment: pushed before a rollout
        or a validation when an optimizer step has changed them since the last push."""
        if self.weights["engine"] != self.weights["policy"]:
            self.engine.load_weights(iter_full_params(self.policy))
            self.weights["engine"] = self.weights["policy"]


# ---- the steps of one outer iteration, in order ------------------------------------------------

def rollout(run: Run, step: int, round: int = 0) -> Experience:
    """1. The engine gets the current weights and samples G completions per prompt of this
    rank's share of the step's prompts (``round`` > 0: DAPO's extra prompts, see
    :func:`dynamic_sampling`)."""
    cfg, info = run.cfg, run.info
    P, G = cfg.prompts_per_step, cfg.group_size
    # Extra rounds read prompts from positions no regular step reads (deterministic: resumable).
    where = step if round == 0 else run.max_steps * round + step
    exp = Experience(step=step, lr=learning_rate(cfg, step, run.max_steps),
                     rows=run.train_data.batch(where, P),
                     share=rank_share(P, cfg.minibatches, info.world, info.rank))
    t0 = time.perf_counter()
    run.sync_engine()   # new weights first (vLLM: into the woken weights, before its KV cache)
    run.engine.wake()
    groups = exp.groups
    counts = {}
    ids = format_prompts([exp.rows[g] for g in groups], run.tok, cfg, run.prompt_limit, counts)
    exp.prompts_truncated += counts.get("truncated", 0)
    if counts:
        log.warning("%d prompt(s) longer than %d tokens were cut on the %s (truncate=%s)",
                    counts["truncated"], run.prompt_limit, cfg.truncate, cfg.truncate)
    out = tp_generate(run, ids, G, seed=step_seed(cfg, step, info.global_rank, salt=101 * round))
    run.engine.sleep()
    for g, p, smp in zip(groups, ids, out):
        exp.prompt_ids[g], exp.samples[g] = p, smp
        exp.completions[g] = [run.tok.decode(s.tokens, skip_special_tokens=True) for s in smp]
    exp.times["rollout"] = time.perf_counter() - t0
    exp.gen_tokens = sum(len(s.tokens) for smp in out for s in smp)
    return exp


def tp_generate(run: Run, ids: list[list[int]], n: int, seed: int) -> list[list[Sample]]:
    """``run.engine.generate(ids, n)``; the ranks of a tensor-parallel group hold the same
    prompts: each samples its contiguous part of them, and they swap the samples (so they hold
    the same ones whatever the engine's determinism)."""
    info = run.info
    if info.tp_size == 1:
        return run.engine.generate(ids, n, seed=seed)
    lo, hi = tp_part(len(ids), info)
    parts = [None] * info.tp_size
    torch.distributed.all_gather_object(parts, run.engine.generate(ids[lo:hi], n, seed=seed),
                                        group=info.tp_group)
    return [s for part in parts for s in part]


def tp_part(n: int, info: DistInfo) -> tuple[int, int]:
    """This tensor-parallel rank's contiguous part ``[lo, hi)`` of ``n`` items its group shares."""
    return n * info.tp_rank // info.tp_size, n * (info.tp_rank + 1) // info.tp_size


def score(run: Run, exp: Experience) -> None:
    """2. Rewards of this rank's completions (contained, see ``RewardRunner``), DAPO's overlong
    shaping, then every rank gets every reward (``all_gather``). The ranks of a tensor-parallel
    group share their completions: each scores its part of them (so they agree on every
    reward, even one a timeout would take away)."""
    cfg, G = run.cfg, run.cfg.group_size
    flat = [(g, k) for g in exp.groups for k in range(G)]
    flat = flat[slice(*tp_part(len(flat), run.info))]
    rows = [exp.rows[g] for g, _ in flat]
    columns = {c: [r.get(c) for r in rows] for c in (rows[0] if rows else {}) if c != "prompt"}
    raw = run.runner([r["prompt"] for r in rows],
                     as_completions(rows, [exp.completions[g][k] for g, k in flat]), columns,
                     [list(exp.samples[g][k].tokens) for g, k in flat])
    local = []
    parts = getattr(run.runner, "last_parts", [])
    shaping = cfg.loss_options().kind.overlong_shaping
    for j, ((g, k), r) in enumerate(zip(flat, raw)):
        smp = exp.samples[g][k]
        shaped = r + overlong_penalty(len(smp.tokens), cfg) if (r is not None and shaping) else r
        local.append((g * G + k, r, shaped, len(smp.tokens), smp.truncated,
                      tuple(p[j] for p in parts)))
    n = cfg.prompts_per_step * G
    exp.raw_rewards, exp.rewards = [None] * n, [None] * n
    exp.lengths, exp.truncated, exp.fn_rewards = [0] * n, [False] * n, [()] * n
    for part in all_gather_objects(local, run.info, every_process=True):
        for i, r, shaped, length, trunc, per_fn in part:
            exp.raw_rewards[i], exp.rewards[i], exp.lengths[i], exp.truncated[i] = r, shaped, length, trunc
            exp.fn_rewards[i] = per_fn


def filter_values(run: Run, exp: Experience) -> list:
    """Per sample, the value DAPO's dynamic sampling looks at (``dynamic_sampling_metric``):
    accuracy (reward >= 1: fully right, as DAPO and verl's ``filter_groups.metric=acc``), the
    reward before or after the overlong shaping, or one reward function's own value."""
    metric = run.cfg.dynamic_sampling_metric
    if metric == "accuracy":
        return [None if r is None else r >= 1.0 - 1e-9 for r in exp.raw_rewards]
    if metric == "reward":
        return exp.raw_rewards
    if metric == "shaped_reward":
        return exp.rewards
    i = run.runner.names.index(metric)
    return [v[i] if v else None for v in exp.fn_rewards]


def advantages(run: Run, exp: Experience) -> None:
    """3. Group advantages over the global batch; a group takes part when two or more of its
    samples have a reward, and (DAPO's dynamic sampling) when their ``dynamic_sampling_metric``
    values are not all equal."""
    cfg, G = run.cfg, run.cfg.group_size
    exp.advantages = compute_advantages(exp.rewards, G, cfg.effective_adv_scale())
    exp.keep = []
    metric = filter_values(run, exp) if cfg.use_dynamic_sampling() else None
    for g in range(cfg.prompts_per_step):
        idx = [i for i in range(g * G, (g + 1) * G) if exp.rewards[i] is not None]
        spread = metric is None or len({metric[i] for i in idx}) > 1
        exp.keep.append(len(idx) > 1 and spread)


def dynamic_sampling(run: Run, exp: Experience) -> Experience:
    """3b. DAPO's dynamic sampling: groups whose rewards are all equal were dropped; sample more
    prompts until P groups are kept, at most ``dynamic_sampling_max_rounds`` extra rounds, and
    keep the first P kept groups (in sampling order). Returns the merged experience: its groups
    are numbered over all rounds; mini-batch k holds the k-th contiguous slice of the kept groups
    (whoever sampled them), so the mini-batches do not depend on the number of ranks."""
    cfg, P, M = run.cfg, run.cfg.prompts_per_step, run.cfg.minibatches
    rounds = [exp]
    while sum(sum(e.keep) for e in rounds) < P and len(rounds) <= cfg.dynamic_sampling_max_rounds:
        e = rollout(run, exp.step, round=len(rounds))
        score(run, e)
        advantages(run, e)
        rounds.append(e)
    exp.kept_first = sum(exp.keep)
    if len(rounds) == 1:
        exp.rounds = 1
        return exp
    m = Experience(step=exp.step, lr=exp.lr, rows=[], share=[])
    owned = set()
    for r, e in enumerate(rounds):
        off = r * P
        m.rows += e.rows
        for g in e.groups:
            m.prompt_ids[off + g], m.samples[off + g] = e.prompt_ids[g], e.samples[g]
            m.completions[off + g] = e.completions[g]
            owned.add(off + g)
        for name in ("raw_rewards", "rewards", "lengths", "truncated", "fn_rewards", "advantages",
                     "keep"):
            getattr(m, name).extend(getattr(e, name))
        for k, v in e.times.items():
            m.times[k] = m.times.get(k, 0.0) + v
        m.gen_tokens += e.gen_tokens
        m.prompts_truncated += e.prompts_truncated
    kept = [u for u, k in enumerate(m.keep) if k][:P]
    chosen = set(kept)
    m.keep = [u in chosen for u in range(len(m.keep))]
    m.share = [[u for i, u in enumerate(kept) if u in owned and i * M // len(kept) == k]
               for k in range(M)]
    m.kept_first, m.rounds = exp.kept_first, len(rounds)
    return m


def minibatches(run: Run, exp: Experience) -> None:
    """4a. This rank's kept groups as model inputs, one batch per mini-batch (a rank with nothing
    in a mini-batch gets stand-ins: every rank runs the same number of FSDP forwards)."""
    cfg, G, pad = run.cfg, run.cfg.group_size, run.tok.pad_token_id
    for mb in exp.share:
        seqs = []
        for g in (g for g in mb if exp.keep[g]):
            for k, smp in enumerate(exp.samples[g]):
                valid = (exp.rewards[g * G + k] is not None and len(smp.tokens) > 0
                         and not (cfg.overlong_filter and smp.truncated))
                seqs.append(Seq(exp.prompt_ids[g] + smp.tokens, len(exp.prompt_ids[g]),
                                exp.advantages[g * G + k], valid, smp.logprobs))
        exp.batches.append(collate(seqs or dummy_seqs(pad, G), pad, run.info.device, run.packed))


def anchor_and_update(run: Run, exp: Experience) -> None:
    """4b. Anchor log-probs of every mini-batch (π_ref = π_θ, no grad), their mismatch with the
    rollout engine's log-probs, the reference model's log-probs (``beta`` > 0), then 5. one
    optimizer step per mini-batch against that frozen anchor."""
    exp.times["anchor"] = exp.times["update"] = 0.0
    if not any(exp.keep):  # the same on every rank: every rank has every reward
        return
    t0 = time.perf_counter()
    exp.anchors = anchor_logprobs(run.policy, exp.batches, run.cfg)
    exp.mismatch = rollout_mismatch(exp.batches, exp.anchors, run.info)
    if run.ref is not None:
        exp.refs = reference_logprobs(run.ref, exp.batches, run.cfg)
    t1 = time.perf_counter()
    exp.stats = update_policy(run.policy, run.optimizer, exp.batches, exp.anchors, run.cfg,
                              run.info, exp.lr, refs=exp.refs or None)
    run.weights["policy"] += 1
    exp.times["anchor"], exp.times["update"] = t1 - t0, time.perf_counter() - t1


# ---- the run -----------------------------------------------------------------------------------

def _setup(cfg: Config, info: DistInfo, fns, train_data, val_rows, limit: int) -> Run:
    P, M, W = cfg.prompts_per_step, cfg.minibatches, info.world
    if P % (M * W):
        raise ConfigError(f"config key 'prompts_per_step': {P} must be a multiple of "
                          f"minibatches x processes = {M} x {W}")
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg)
    policy = build_policy(cfg, info, cfg.seed)
    optimizer = torch.optim.AdamW(trainable_params(policy), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    engine = make_engine(cfg, tok, info.device)
    packed = cfg.packed == "true" or (cfg.packed == "auto" and flash_attn_available(info.device))
    runner = RewardRunner(fns, cfg.reward_weights or None, cfg.reward_timeout, cfg.reward_isolation)
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * len(train_data) / P)
    return Run(cfg, info, tok, policy, optimizer, engine, runner, train_data, val_rows, max_steps,
               packed, Path(cfg.output_dir), limit)


def _run(cfg: Config, info: DistInfo, fns, train_data, val_rows, limit: int,
         stop: StopOnSignal) -> dict:
    t_start = time.time()
    run = _setup(cfg, info, fns, train_data, val_rows, limit)
    try:
        return _loop(run, t_start, stop)
    finally:
        run.runner.close()


def _loop(run: Run, t_start: float, stop: StopOnSignal) -> dict:
    cfg, info, out_dir, max_steps = run.cfg, run.info, run.out_dir, run.max_steps

    # ---- output_dir: ours alone; resume only forwards -----------------------------------------
    found, state = claim_output_dir(cfg, info, run.policy, run.optimizer, max_steps)
    start_step = state["step"] if found else 0
    if found:
        run.runner.errors = state.get("reward_errors", 0)
        run.runner.timeouts = state.get("reward_timeouts", 0)
        run.runner.invalid = state.get("reward_invalid", 0)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(cfg, out_dir)
        lora = (f" (LoRA r={cfg.lora_r}: {sum(p.numel() for p in trainable_params(run.policy)) / 1e6:.3f}M "
                f"trainable)" if cfg.lora_r else "")
        tp = f" (tensor_parallel_size={info.tp_size})" if info.tp_size > 1 else ""
        print(f"opo-train: {param_count(run.policy) / 1e6:.2f}M params{lora}, {info.procs} "
              f"process(es){tp} on "
              f"{info.device.type}, loss={cfg.loss} ({cfg.loss_impl}), {max_steps} steps x "
              f"{cfg.prompts_per_step} prompts x {cfg.group_size} samples, "
              f"{'packed' if run.packed else 'padded'} batches, engine={cfg.engine} -> {out_dir}",
              flush=True)
        if found:
            print(f"resumed from {found} (step {start_step})", flush=True)
    logger = MetricsLogger(out_dir, info.is_main, resume_step=start_step if found else None,
                           tensorboard=cfg.tensorboard and "tensorboard" in cfg.report_to,
                           wandb_config=cfg.to_dict() if "wandb" in cfg.report_to else None)

    # ---- warm start -------------------------------------------------------------------------
    sft_rows = None
    if cfg.sft_steps and found is None:
        sft_rows = warm_start(run.policy, run.tok, cfg, info, run.packed, out_dir)
    if cfg.beta > 0:  # the policy as RL starts (a resumed run reloads the one it saved)
        from .model import build_reference
        run.ref = build_reference(cfg, info, run.policy, out_dir, resumed=found is not None)

    # ---- RL: outer iterations ---------------------------------------------------------------
    failed_steps = zero_steps = 0
    stop.in_steps = True
    t_steps = time.time()
    for step in range(start_step, max_steps):
        t_step = time.perf_counter()
        exp = rollout(run, step)                       # 1. sample with the current weights
        score(run, exp)                                # 2. rewards, gathered over ranks
        failed_steps = failed_steps + 1 if all(r is None for r in exp.rewards) else 0
        if cfg.reward_max_failed_steps and failed_steps >= cfg.reward_max_failed_steps:
            r = run.runner
            raise TrainingStopped(
                f"no sample got a reward in {failed_steps} steps in a row (reward errors "
                f"{r.errors}, timeouts {r.timeouts}, invalid values {r.invalid}; last: "
                f"{r.last_failure or 'every function returned None'}): fix the reward "
                f"function(s); reward_max_failed_steps=0 never stops")
        advantages(run, exp)                           # 3. group advantages, DAPO filter
        if cfg.use_dynamic_sampling():
            exp = dynamic_sampling(run, exp)           # 3b. DAPO: refill the kept groups
        minibatches(run, exp)                          # 4. model inputs per mini-batch
        anchor_and_update(run, exp)                    # 4-5. frozen anchor, optimizer steps

        # ---- 6. metrics, validation, checkpoint ------------------------------------------------
        row = summarize(exp, cfg, info, run.runner)
        zero_steps = zero_steps + 1 if not row.get("reward_std") and not row.get("grad_norm") else 0
        if cfg.zero_signal_steps and zero_steps == cfg.zero_signal_steps and info.is_main:
            _warn_zero_signal(zero_steps, row)
        row["elapsed"] = time.time() - t_start
        row["step_time"] = time.perf_counter() - t_step
        row["eta_s"] = (time.time() - t_steps) / (step + 1 - start_step) * (max_steps - step - 1)
        row["peak_mem_gb"] = max(all_gather_objects(peak_memory_gb(info.device), info,
                                                    every_process=True))
        if cfg.val_every and run.val_rows and (step + 1) % cfg.val_every == 0:
            run.sync_engine()  # score the weights after this step's updates
            run.engine.wake()
            row.update(validate(run.engine, run.val_rows, run.tok, run.runner, cfg, info, step + 1,
                                run.prompt_limit))
            run.engine.sleep()
        console = (step + 1) % cfg.log_every == 0 or step + 1 == max_steps
        logger.log(row, console=console_line(row, max_steps) if console and info.is_main else None)
        if "val_accuracy" in row and info.is_main:
            print(validation_line(row, len(run.val_rows), max_steps), flush=True)
        if cfg.log_completions_every and (step + 1) % cfg.log_completions_every == 0:
            logger.log_samples(step + 1, sample_table(exp, cfg.group_size, cfg.log_completions_count))
        saved = None
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < max_steps:
            saved = ckpt.save(out_dir, step + 1, run.policy, run.optimizer,
                              trainer_state(cfg, step + 1, run.train_data, run.runner), info,
                              cfg.keep_checkpoints)
        if step + 1 < max_steps and stop.requested():
            stop.in_steps = False  # a second signal now stops at once
            if saved is None:
                saved = ckpt.save(out_dir, step + 1, run.policy, run.optimizer,
                                  trainer_state(cfg, step + 1, run.train_data, run.runner), info,
                                  cfg.keep_checkpoints)
            logger.close()
            raise interrupted(cfg, info, stop.signum, saved)
    stop.in_steps = False

    # ---- the end: final checkpoint, HF export, plot -----------------------------------------
    if found is not None and start_step == max_steps:
        final = found  # resumed at the end: the checkpoint already holds these weights
    else:
        final = ckpt.save(out_dir, max_steps, run.policy, run.optimizer,
                          trainer_state(cfg, max_steps, run.train_data, run.runner), info,
                          cfg.keep_checkpoints)
    if cfg.export_hf:
        save_hf(run.policy, run.tok, out_dir / "hf_model", info)
    png = logger.plot(extra_rows=sft_rows) if cfg.plot else None
    logger.close()
    return _summary(logger, final, out_dir, t_start, info, png)


def sample_table(exp: Experience, G: int, n: int) -> list[dict]:
    """The first ``n`` of this rank's samples of the step: prompt, completion, reward, advantage."""
    out = []
    for g in exp.groups:
        for k, text in enumerate(exp.completions[g]):
            if len(out) == n:
                return out
            i = g * G + k
            out.append({"prompt": exp.rows[g]["prompt"], "completion": text,
                        "reward": exp.raw_rewards[i], "advantage": exp.advantages[i] if exp.advantages else None})
    return out


def _warn_zero_signal(n: int, row: dict) -> None:
    rm = row.get("reward_mean")
    log.warning(
        "no learning signal: for %d steps every sample got the same reward (%s) and the "
        "gradient is zero. The policy cannot improve like this: a randomly initialized model must "
        "first learn the answer format (keep the warm start, sft_steps > 0, or start from a "
        "trained model), or the reward needs partial credit; check the config this run started "
        "from (a YAML can name its base with `base: toy`).", n, "none" if rm is None else f"{rm:.3f}")


def _summary(logger, final, out_dir: Path, t_start: float, info: DistInfo, png) -> dict:
    summary = dict(logger.rows[-1]) if logger.rows else {}
    summary.update(checkpoint=str(final), output_dir=str(out_dir), wall_time=time.time() - t_start,
                   plot=str(png) if png else None)
    if info.is_main:
        rw = [r["reward_mean"] for r in logger.rows if r.get("reward_mean") is not None]
        k = max(1, min(10, len(rw) // 4))
        if rw:
            summary["reward_first"], summary["reward_last"] = sum(rw[:k]) / k, sum(rw[-k:]) / k
            print(f"done in {summary['wall_time']:.0f}s: mean reward {summary['reward_first']:.3f} "
                  f"(first {k} steps) -> {summary['reward_last']:.3f} (last {k} steps); checkpoint "
                  f"{final}; metrics {out_dir / 'metrics.jsonl'}", flush=True)
    return summary


def preflight(cfg: Config, reward_fns=None, dataset=None, val_dataset=None):
    """Every check that needs no model: the configuration's rules, then what it asks of the
    machine (paths, device, packages, kernel backend, reward functions, data, prompt lengths,
    resume), all run so that every problem is reported together in one :class:`ConfigError`
    before anything big is loaded. Returns (train data, validation rows, reward functions,
    prompt token limit)."""
    errors = cfg.problems()
    found = {}

    def check(name, fn, *args):
        try:
            found[name] = fn(*args)
        except ConfigError as e:
            errors.extend(e.problems)
        except Exception:  # noqa: BLE001 - a consequence of a value already reported
            if not errors:
                raise
    check("machine", machine_problems, cfg)
    check("rewards", reward_functions, cfg, reward_fns)
    if dataset is not None or cfg.task == "toy" or cfg.train_file:  # else: reported above
        check("data", load_data, cfg, dataset, val_dataset)
    if "data" in found and "machine" in found:
        check("limit", check_prompts, cfg, found["machine"], *found["data"])
    if cfg.resume and (changed := changed_from_run(cfg)):
        errors.append(
            f"config key 'resume': this config changes what the run in {cfg.output_dir!r} was "
            f"trained with ({'; '.join(changed)}); resume with its own config (--config "
            f"{Path(cfg.output_dir) / 'config.yaml'} resume=true), or use another output_dir")
    if errors:
        raise ConfigError.of(list(dict.fromkeys(errors)))
    return (*found["data"], found["rewards"], found["limit"])


def machine_problems(cfg: Config):
    """Model, tokenizer, device, packages and kernel backend; returns (tokenizer, HF config)."""
    from .model import hf_config, load_tokenizer
    errors = []
    conf = tok = None
    if cfg.device == "cuda" and not torch.cuda.is_available():
        errors.append("config key 'device': 'cuda' asked but no CUDA device is available")
    for what in ("model", "tokenizer"):
        if what == "tokenizer" and conf is None and not cfg.tokenizer and errors:
            continue  # the model folder is the tokenizer's too: reported once
        try:
            if what == "model":
                conf = hf_config(cfg)          # model path, model_overrides keys
            else:
                tok = load_tokenizer(cfg)      # tokenizer path
        except ConfigError as e:
            errors.extend(e.problems)
    if "wandb" in cfg.report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            errors.append("config key 'report_to': 'wandb' needs the wandb package (pip install wandb)")
    if cfg.lora_r:
        from .model import lora_config
        try:
            lora_config(cfg)  # peft installed?
        except ConfigError as e:
            errors.extend(e.problems)
        if cfg.model == "tiny":
            log.warning("lora_r=%d on model=tiny: LoRA trains small updates of a base that is "
                        "random here, and a random-init model cannot learn the task from them; "
                        "use lora_r=0 (full training) or a trained model", cfg.lora_r)
    if cfg.tensor_parallel_size > 1:
        errors += tensor_parallel_problems(cfg, conf)
    if cfg.engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            errors.append("config key 'engine': 'vllm' needs vLLM (pip install 'opo[vllm]')")
    # The kernel backend, tried on a tiny problem on the run's device (public API only).
    import opo_kernels as ok
    dev = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and
                                                          torch.cuda.is_available()) else "cpu")
    try:
        h = torch.zeros(1, 2, 8, device=dev)
        ok.linear_logprobs(h, torch.zeros(16, 8, device=dev), torch.zeros(1, 2, dtype=torch.long,
                                                                          device=dev),
                           backend=cfg.kernel_backend)
    except Exception as e:  # noqa: BLE001 - whatever the backend says, on one line
        errors.append(f"config key 'kernel_backend': {cfg.kernel_backend!r} cannot run on "
                      f"{dev.type}: {' '.join(str(e).split())}")
    if errors:
        raise ConfigError.of(errors)
    return tok, conf


def tensor_parallel_problems(cfg: Config, conf) -> list[str]:
    """What a vocabulary-split head (``tensor_parallel_size`` k > 1) asks of the launch and the
    model: k dividing the processes, a vocabulary that gives each of the k ranks rows, an output
    embedding of its own."""
    import os

    from .model import head_rows
    k, errors = cfg.tensor_parallel_size, []
    procs = int(os.environ.get("WORLD_SIZE", "1"))
    if procs % k:
        errors.append(f"config key 'tensor_parallel_size': must divide the number of processes "
                      f"({procs}; torchrun --nproc_per_node sets it), got {k}")
    if conf is None:
        return errors
    V = getattr(conf, "vocab_size", None) or 0
    if head_rows(V, k, k - 1)[0] >= V:
        errors.append(f"config key 'tensor_parallel_size': {k} shards of the model's {V}-token "
                      f"vocabulary ({-(-V // k)} rows each) leave a rank without rows, got {k}")
    if getattr(conf, "tie_word_embeddings", False):
        errors.append(f"config key 'tensor_parallel_size': the model ties its LM head to the input "
                      f"embedding (tie_word_embeddings), and a vocabulary shard of the head cannot "
                      f"be the embedding; tensor_parallel_size must be 1 for it, got {k}")
    return errors


def reward_functions(cfg: Config, reward_fns) -> list:
    """The run's reward functions: the caller's, or those the ``rewards`` key names; their
    weights and DAPO's filter metric checked against them."""
    errors = []
    if reward_fns is not None:
        fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
        if not fns or not all(callable(f) for f in fns):
            raise TypeError(f"reward_fns must be a callable or a list of callables, got {reward_fns!r}")
    else:
        fns = resolve_rewards(cfg.rewards, cfg.task, cfg.math_verify_timeout)
    if cfg.reward_weights and len(cfg.reward_weights) != len(fns):
        errors.append(f"config key 'reward_weights': needs one weight per reward function "
                      f"({len(fns)}: {', '.join(getattr(f, '__name__', '?') for f in fns)}), "
                      f"got {cfg.reward_weights!r}")
    names = [getattr(f, "__name__", type(f).__name__) for f in fns]
    if cfg.use_dynamic_sampling() and cfg.dynamic_sampling_metric not in (
            "accuracy", "reward", "shaped_reward", *names):
        errors.append(f"config key 'dynamic_sampling_metric': must be accuracy, reward, "
                      f"shaped_reward or a reward function's name ({', '.join(names)}), got "
                      f"{cfg.dynamic_sampling_metric!r}")
    if errors:
        raise ConfigError.of(errors)
    return fns


def load_data(cfg: Config, dataset=None, val_dataset=None):
    """(train prompt source, validation rows or None): the caller's, else the config's task."""
    if dataset is None:
        train_data, val_rows = _default_data(cfg)
    else:  # a user's data: validation only on the user's validation rows
        train_data, val_rows = as_dataset(dataset, seed=cfg.data_seed), None
    if val_dataset is not None:
        val_rows = list(val_dataset)
    if val_rows is not None and not val_rows and cfg.val_every:
        raise ConfigError("config key 'val_file': the validation set is empty")
    return train_data, val_rows


def check_prompts(cfg: Config, machine, train_data, val_rows) -> int:
    """The longest prompt the run takes (``max_prompt_length``, and the model's positions less
    ``max_new_tokens``); with ``truncate=error`` every prompt of a finite dataset is measured now
    (and any other when it is drawn), so a long one stops the run before the model loads."""
    tok, conf = machine
    limit = cfg.max_prompt_length
    positions = getattr(conf, "max_position_embeddings", None)
    if positions:
        if positions - cfg.max_new_tokens < 1:
            raise ConfigError(f"config key 'max_new_tokens': {cfg.max_new_tokens} leaves no room for "
                              f"a prompt in the model's {positions} positions")
        limit = min(limit, positions - cfg.max_new_tokens)
    if cfg.truncate == "error":
        rows = list(train_data.rows) if hasattr(train_data, "rows") else []
        for part in (rows, val_rows or []):
            for i in range(0, len(part), 256):
                format_prompts(part[i:i + 256], tok, cfg, limit)
    return limit


# Keys a resumed run may change: how long it runs, where and how it reports, not what it trains.
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "resume", "overwrite", "max_steps", "epochs", "device", "cpu_threads",
    "kernel_backend", "activation_checkpointing", "attn_implementation", "packed", "log_every",
    "save_every", "keep_checkpoints", "export_hf", "plot", "tensorboard", "report_to",
    "wandb_project", "log_completions_every", "log_completions_count", "val_every", "val_size",
    "val_file", "val_levels", "reward_timeout", "reward_max_failed_steps", "zero_signal_steps",
    "tensor_parallel_size"})


def write_run_config(cfg: Config, out_dir: Path) -> None:
    """``config.yaml``: the run's configuration, which ``--config`` takes back to resume it."""
    import yaml
    d = cfg.to_dict()
    d["resume"] = d["overwrite"] = False  # how this start went, not what the run is
    (out_dir / "config.yaml").write_text(yaml.safe_dump(d, sort_keys=False))


def changed_from_run(cfg: Config) -> list[str]:
    """``key: old -> new`` for each key that differs from the run in ``output_dir`` in what it
    trains (``RESUME_MAY_CHANGE`` aside); [] when there is no run config."""
    import yaml

    from .config import _FIELDS
    path = Path(cfg.output_dir) / "config.yaml"
    if not path.exists():
        return []
    old = yaml.safe_load(path.read_text()) or {}
    out = []
    for k, v in cfg.to_dict().items():
        if k in RESUME_MAY_CHANGE:
            continue
        f = _FIELDS[k]
        was = old.get(k, f.default_factory() if callable(f.default_factory) else f.default)
        if was != v:
            out.append(f"{k}: {was!r} -> {v!r}")
    return out


def claim_output_dir(cfg: Config, info: DistInfo, policy, optimizer, max_steps: int):
    """Make ``output_dir`` this run's own before anything is written there.

    A run already there is continued (``resume=true``: the newest checkpoint that loads, see
    ``checkpoint.load_latest``), deleted (``overwrite=true``), or the run is refused: mixing two
    runs' checkpoints would prune the new run's and resume the old one. A checkpoint beyond
    ``max_steps`` is refused too (its weights would be saved under an earlier step's name).
    Returns (checkpoint path or None, its trainer state or None)."""
    out_dir = Path(cfg.output_dir)
    there = ckpt.existing_run(out_dir)
    if cfg.overwrite:
        if info.is_main and there:
            ckpt.remove_run(out_dir)
        if info.procs > 1:
            torch.distributed.barrier()
        return None, None
    if not cfg.resume:
        if there:
            raise ConfigError(
                f"config key 'output_dir': {str(out_dir)!r} already holds a run ({there}); pass "
                f"resume=true to continue it, overwrite=true to delete it and start over, or "
                f"another output_dir")
        return None, None
    latest = ckpt.latest(out_dir)
    if latest is None:
        if info.is_main:
            print(f"opo-train: resume=true but {str(out_dir)!r} holds no complete checkpoint: "
                  f"nothing to resume, starting at step 0", flush=True)
            if ckpt.existing_run(out_dir):
                ckpt.remove_run(out_dir)  # what a run that saved nothing left: not mixed with this
        if info.procs > 1:
            torch.distributed.barrier()
        return None, None
    if ckpt.step_of(latest) > max_steps:
        raise ConfigError(
            f"config key 'max_steps': {max_steps} is below the step of the latest checkpoint "
            f"{latest} ({ckpt.step_of(latest)}); resuming would save later weights under an "
            f"earlier step's name. Raise max_steps, or use another output_dir")
    found, state = ckpt.load_latest(out_dir, policy, optimizer, info)
    if found is None and latest is not None:
        raise ConfigError(f"config key 'resume': no checkpoint in {str(out_dir)!r} could be loaded "
                          f"(see the warnings above)")
    return found, state


def learning_rate(cfg: Config, step: int, max_steps: int) -> float:
    """Linear warm-up, then constant or cosine decay; a function of the step (exact resume)."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    if cfg.lr_schedule == "cosine" and max_steps > 1:
        frac = 0.5 * (1 + math.cos(math.pi * step / (max_steps - 1)))
        lr *= cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * frac
    return lr


def trainer_state(cfg: Config, step: int, data, runner: RewardRunner) -> dict:
    pos = data.position(step, cfg.prompts_per_step) if hasattr(data, "position") else {"step": step}
    return {"step": step, "data_position": pos, "reward_errors": runner.errors,
            "reward_timeouts": runner.timeouts, "reward_invalid": runner.invalid}


# The loss's metrics of the off-policy terms: weighted means, or min / max over the step.
_TOKEN_MEANS = ("kl", "entropy_mask_frac")
_IS_MINMAX = {"is_weight_min": min, "is_weight_max": max}


def off_policy_metrics(exp: Experience, cfg: Config, info: DistInfo) -> dict:
    """The rollout/anchor mismatch (computed by the trainer, None without rollout log-probs) and
    the loss's IS / KL statistics of the step's optimizer steps (over every rank): ``is_*``
    means weighted by what they are means over (tokens or sequences), min / max over all."""
    row = {"mismatch_k1": None, "mismatch_k3": None, "mismatch_max_abs": None, **exp.mismatch}
    mode = cfg.loss_options().is_mode
    per_seq = mode is not None and mode.per_sequence
    keys = sorted({k for s in exp.stats for k in s if k.startswith("is_") or k in _TOKEN_MEANS})
    parts = all_gather_objects([{k: s[k] for k in keys + ["num_tokens", "num_seqs"] if k in s}
                                for s in exp.stats], info)
    stats = [s for part in parts for s in part]
    for k in sorted({k for s in stats for k in s} - {"num_tokens", "num_seqs"}):
        vals = [s for s in stats if k in s]
        if k in _IS_MINMAX:
            w = [s[k] for s in vals if s.get("num_tokens", 0) > 0]
            row[k] = _IS_MINMAX[k](w) if w else None
        else:
            wk = "num_seqs" if (per_seq and k.startswith("is_")) else "num_tokens"
            tot = sum(s.get(wk, 0.0) for s in vals)
            row[k] = sum(s[k] * s.get(wk, 0.0) for s in vals) / tot if tot > 0 else None
    return row


def per_function_rewards(exp: Experience, names: list[str]) -> dict:
    """``reward_<name>_mean`` / ``_std`` of each reward function (unweighted, over the samples it
    scored), so a combined reward shows which part moves."""
    row = {}
    seen = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}{seen[name]}"
        vals = [v[i] for v in exp.fn_rewards if v and v[i] is not None]
        m = sum(vals) / len(vals) if vals else None
        row[f"reward_{key}_mean"] = m
        row[f"reward_{key}_std"] = (math.sqrt(sum((x - m) ** 2 for x in vals) / (len(vals) - 1))
                                    if len(vals) > 1 else None)
    return row


def zero_spread(rewards: list, G: int) -> float:
    """The share of groups whose rewards are all equal (or fewer than two): zero advantage, no
    learning signal from them."""
    groups = [[r for r in rewards[g:g + G] if r is not None] for g in range(0, len(rewards), G)]
    return sum(len(set(v)) < 2 for v in groups) / max(len(groups), 1)


def summarize(exp: Experience, cfg: Config, info: DistInfo, runner: RewardRunner) -> dict:
    """One metrics row: global reward stats (every rank has all rewards) + update stats.
    ``accuracy`` is the share of samples whose (unshaped) reward is >= 1, i.e. fully correct."""
    step, raw, rewards, adv, lens = exp.step + 1, exp.raw_rewards, exp.rewards, exp.advantages, exp.lengths
    trunc, keep_group, stats, gen_tokens, lr = exp.truncated, exp.keep, exp.stats, exp.gen_tokens, exp.lr
    t_rollout, t_anchor, t_update = exp.times["rollout"], exp.times["anchor"], exp.times["update"]
    valid = [r for r in raw if r is not None]
    n = max(len(valid), 1)
    mean = sum(valid) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in valid) / max(len(valid) - 1, 1)) if valid else 0.0
    gen_total, upd_tokens, cut = all_reduce_sum([gen_tokens, sum(s["tokens"] for s in stats),
                                                 exp.prompts_truncated], info)
    # Kernel metrics are per rank; weight them by the rank's count and sum over ranks.
    keys = ["entropy", "delta_mean", "delta_abs_mean", "chi2", "omega_std", "clip_frac"]
    sums = [sum(s.get(k, 0.0) * s["count"] for s in stats) for k in keys] + \
           [sum(s["count"] for s in stats)]
    sums = all_reduce_sum(sums, info)
    wsum = max(sums[-1], 1e-12)
    row = {"step": step, "reward_mean": mean if valid else None, "reward_std": std,
           **per_function_rewards(exp, runner.names), "zero_spread_frac": zero_spread(rewards, cfg.group_size),
           "accuracy": sum(r >= 1.0 - 1e-9 for r in valid) / n,
           "loss": sum(s["loss"] for s in stats) / len(stats) if stats else None,
           "grad_norm": sum(s["grad_norm"] for s in stats) / len(stats) if stats else None}
    kind = cfg.loss_options().kind
    for k, v in zip(keys, sums):
        if k != "clip_frac" or kind.metric == "clip_frac":
            row[k] = v / wsum if stats else None
    if not kind.escort:  # ω (escort weights) exists only in paper-mode OPO
        row["omega_std"] = None
    if stats:
        first = [s for s in stats if s["minibatch"] == 0 and s["epoch"] == 0]
        last = stats[-1]
        row["delta_abs_first"] = first[0]["delta_abs_mean"] if first else None
        row["delta_abs_last"] = last["delta_abs_mean"]
        om_min = min(s.get("omega_min", math.inf) for s in stats)
        om_max = max(s.get("omega_max", -math.inf) for s in stats)
        lo_hi = all_gather_objects((om_min, om_max), info)
        row["omega_min"] = min(x[0] for x in lo_hi) if kind.escort else None
        row["omega_max"] = max(x[1] for x in lo_hi) if kind.escort else None
    a_rng = (max(adv) - min(adv)) if adv else 0.0
    row.update(off_policy_metrics(exp, cfg, info))
    row["adv_range"] = a_rng
    row["grad_response_eff"] = (row["grad_norm"] / (0.5 * a_rng)) if (stats and a_rng > 0) else None
    row["completion_len_mean"] = sum(lens) / max(len(lens), 1)
    row["completion_len_max"] = max(lens) if lens else 0
    row["truncated_frac"] = sum(trunc) / max(len(trunc), 1)
    row["prompts_truncated"] = int(cut)
    row["groups_kept"] = sum(keep_group)
    if exp.rounds:
        row["groups_kept_first_round"] = exp.kept_first
        row["sampling_rounds"] = exp.rounds
    row["reward_none_frac"] = sum(r is None for r in rewards) / max(len(rewards), 1)
    row["reward_errors"] = runner.errors
    row["reward_timeouts"] = runner.timeouts
    row["reward_invalid"] = runner.invalid
    row["rollout_tokens_per_s"] = gen_total / max(t_rollout, 1e-9)
    row["train_tokens_per_s"] = upd_tokens / t_update if t_update > 0 else None
    row["anchor_time"] = t_anchor
    row["update_time"] = t_update
    row["rollout_time"] = t_rollout
    row["lr"] = lr
    row["optimizer_steps"] = len(stats)
    return row
