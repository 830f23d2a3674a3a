"""Iterative RLHF as a leader-follower game: a transformers policy (leader) and reward model (follower).

    stackelberg run llm/rlhf            # standard iterative RLHF on the synthetic task (collapses)
    stackelberg run llm/fpo-relaxed     # the same with the FPO penalty

A round (its LLM experiment), for `prompts_per_round` prompts:

1. the reference policy samples one reference answer per prompt, the policy `candidates` answers;
2. the oracle labels them (gold utility U), the RM scores them (proxy reward r);
3. the leader update, one of
   a. `bestofn` (the paper): score = r - FPO penalty (or + any estimator's steering reward); the best candidate
      of each prompt wins; SFT (mean token negative log-likelihood) step on the winners;
   b. `rloo`: policy gradient on r - kl_coef * KL(policy || reference) with a per-prompt leave-one-out baseline;
      the core's score-function path adds each sample's steering reward, so every estimator applies;
4. the RM update on (answer vs reference answer): Bradley-Terry with the soft label sigmoid(U - U_ref)
   (`bt-soft`), a hard label (`bt-hard`) or regression on U (`regression`); trained on the winners (bestofn) or
   on every candidate (rloo).

With `rm_train: head` only the RM's linear head trains: the frozen backbone's features are computed once per
answer, the reward is `features @ w + b`, and the per-sample gradients FPO needs are read off in closed form.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from stackelberg import LeaderFollowerGame
from stackelberg.config import doc
from stackelberg.game import detach_batch
from stackelberg.hypergrad.base import SteeringProblem

from . import models
from .oracle import build_scorer, win_rate
from .task import bad_words, ensure_synthetic

DATA = Path(__file__).resolve().parent / "data"
# the players run in eval mode on purpose (see `train`); Lightning warns about it once per fit
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")


def read_prompts(path: str) -> List[str]:
    """Prompts from a JSONL file (one object per line with a 'prompt' field) or a text file (one per line)."""
    p = Path(path)
    if not p.is_file() and (DATA / p.name).is_file() and not p.is_absolute() and len(p.parts) == 1:
        p = DATA / p.name  # a bare file name refers to the package's data folder
    if not p.is_file():
        raise ValueError(f"prompt file not found: {path}")
    lines = [line for line in p.read_text().splitlines() if line.strip()]
    if p.suffix == ".jsonl":
        return [json.loads(line)["prompt"] for line in lines]
    return lines


def select(batch: Dict[str, Any], index: Tensor) -> Dict[str, Any]:
    """The rows `index` of every per-sample entry of a batch (tensors and lists of length n)."""
    n = batch["gold"].shape[0]
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
            out[k] = v[index]
        elif isinstance(v, list) and len(v) == n:
            out[k] = [v[i] for i in index.tolist()]
        else:
            out[k] = v
    return out


class LLMRLHFGame(LeaderFollowerGame):
    """Policy (leader) against reward model (follower), with an oracle and a judge; see the module docstring."""

    steering_path = "score_function"
    best_metrics = {"true/utility": "max", "eval/gold": "max"}
    progress_metrics = ("true/utility", "proxy/reward", "policy/kl_to_ref")

    @dataclass
    class Config:
        policy: str = doc("", "policy checkpoint (folder or hub id); empty: <synthetic_dir>/policy")
        reward_model: str = doc("", "RM checkpoint (folder or hub id); empty: <synthetic_dir>/reward_model")
        synthetic_dir: str = doc("runs/llm_synthetic/init",
                                 "where the synthetic task's pre-trained checkpoints live (built if missing)")
        prompts: str = doc("synthetic_train.jsonl", "training prompts: JSONL ('prompt' field) or text file")
        eval_prompts: str = doc("synthetic_eval.jsonl", "held-out prompts for evaluation")
        max_prompts: int = doc(0, "use only the first this many training prompts (0: all)")
        chat_template: bool = doc(False, "format prompts with the policy tokenizer's chat template")
        oracle: str = doc("synthetic", "labels for the RM: synthetic | ref-loglik | package.module:function")
        judge: str = doc("synthetic", "who wins pairwise comparisons at evaluation (same choices as oracle)")
        update: str = doc("bestofn", "leader update: bestofn (best-of-n + SFT, the paper) | rloo (policy "
                                     "gradient with a leave-one-out baseline; every estimator applies)")
        prompts_per_round: int = doc(4, "prompts per round (per process under DDP)")
        candidates: int = doc(8, "answers sampled per prompt (n)")
        max_new_tokens: int = doc(12, "longest answer in tokens")
        temperature: float = doc(1.0, "sampling temperature")
        top_p: float = doc(1.0, "nucleus sampling threshold")
        kl_coef: float = doc(0.0, "weight of KL(policy || reference) subtracted from the reward (rloo)")
        follower_loss: str = doc("bt-soft", "RM loss: bt-soft (label sigmoid(U - U_ref)) | bt-hard | regression")
        rm_train: str = doc("head", "train the RM's linear head only (head) or all of it (all)")
        rm_max_length: int = doc(512, "RM input length limit (tokens)")
        lora: bool = doc(False, "train LoRA adapters instead of the whole policy (peft)")
        lora_r: int = doc(16, "LoRA rank")
        lora_alpha: int = doc(32, "LoRA alpha")
        lora_targets: List[str] = doc(["q_proj", "k_proj", "v_proj", "o_proj"], "modules that get adapters")
        load_in_4bit: bool = doc(False, "load the policy's base in 4 bits (bitsandbytes, GPU only)")
        dtype: str = doc("float32", "float32 | bfloat16 | float16 for policy and RM")
        eval_every: int = doc(50, "evaluate on the held-out prompts every this many rounds (and at the end)")
        eval_samples: int = doc(4, "answers per held-out prompt at evaluation")
        text_samples: int = doc(4, "answers logged to TensorBoard as text at each evaluation")
        torch_threads: int = doc(1, "torch CPU threads per process (0: leave torch's default)")
        dump_state: str = doc("", "tests: each process saves its final policy and RM parameters here")

    def __init__(self, config: Optional["LLMRLHFGame.Config"] = None, **kwargs):
        super().__init__(**kwargs)
        self.config = c = config or LLMRLHFGame.Config()
        if c.update not in ("bestofn", "rloo"):
            raise ValueError(f"game.update must be 'bestofn' or 'rloo', got {c.update!r}")
        if c.follower_loss not in ("bt-soft", "bt-hard", "regression"):
            raise ValueError(f"game.follower_loss must be bt-soft, bt-hard or regression, got {c.follower_loss!r}")
        if c.torch_threads > 0:
            torch.set_num_threads(c.torch_threads)
        policy_path, rm_path = c.policy, c.reward_model
        if not policy_path or not rm_path:
            folder = ensure_synthetic(c.synthetic_dir)
            policy_path = policy_path or str(folder / "policy")
            rm_path = rm_path or str(folder / "reward_model")
        self.leader, self.tokenizer = models.load_policy(
            policy_path, dtype=c.dtype, lora=c.lora, lora_r=c.lora_r, lora_alpha=c.lora_alpha,
            lora_targets=c.lora_targets, load_in_4bit=c.load_in_4bit)
        # with LoRA the reference is the base model (adapters off); otherwise a frozen copy
        self.reference = None if c.lora else models.frozen_copy(self.leader)
        # a head-only RM stays in float32: its frozen backbone only runs forward, and a bf16 head would round
        # away the small steps of its optimiser
        rm_dtype = c.dtype if c.rm_train == "all" else "float32"
        self.follower, self.rm_tokenizer, self.head = models.load_reward_model(rm_path, train=c.rm_train,
                                                                               dtype=rm_dtype)
        self.head_only = c.rm_train == "head"
        self.train_prompts = read_prompts(c.prompts)
        if c.max_prompts > 0:
            self.train_prompts = self.train_prompts[: c.max_prompts]
        self.eval_prompt_list = read_prompts(c.eval_prompts)
        self.oracle = build_scorer(c.oracle, self._reference_loglik)
        self.judge = build_scorer(c.judge, self._reference_loglik)
        self._follower_data: Dict[str, Any] = {}
        self._round_logs: Dict[str, float] = {}
        self._eval_answers: List[Dict[str, Any]] = []

    # ----------------------------------------------------------------------------------------------------
    # Models in eval mode always: a sample's log-probability must be that of the policy that drew it
    # ----------------------------------------------------------------------------------------------------

    def train(self, mode: bool = True):
        """Lightning's train() would switch dropout on; the players stay in eval mode."""
        super().train(mode)
        for module in self.children():
            module.eval()
        return self

    def _ref_model(self):
        return models.adapters_disabled(self.leader) if self.reference is None else _Same(self.reference)

    def _reference_loglik(self, prompts: Sequence[str], answers: Sequence[str]) -> Tensor:
        """The reference policy's mean token log-likelihood of prompt + answer (the paper's oracle)."""
        enc = self.tokenizer([f"{p} {a}" for p, a in zip(prompts, answers)], padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        with torch.no_grad(), self._ref_model() as ref:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1].float()
            tok = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
        return (tok.sum(-1) / mask[:, 1:].sum(-1).clamp(min=1)).cpu()

    # ----------------------------------------------------------------------------------------------------
    # Sampling and scoring
    # ----------------------------------------------------------------------------------------------------

    def _answers(self, prompts: List[str], n: int, with_graph: bool) -> Dict[str, Any]:
        """n policy answers per prompt and one reference answer, with their texts, RM inputs and log-probs."""
        c = self.config
        enc = models.encode_prompts(self.tokenizer, prompts, c.chat_template, self.device)
        answers, mask = models.sample(self.leader, self.tokenizer, enc, n, c.max_new_tokens, c.temperature,
                                      c.top_p)
        with self._ref_model() as ref:
            ref_answers, ref_mask = models.sample(ref, self.tokenizer, enc, 1, c.max_new_tokens, c.temperature,
                                                  c.top_p)
        prompt_ids = enc["input_ids"].repeat_interleave(n, 0)
        prompt_mask = enc["attention_mask"].repeat_interleave(n, 0)
        texts = models.decode(self.tokenizer, answers, mask)
        ref_texts = [t for t in models.decode(self.tokenizer, ref_answers, ref_mask) for _ in range(n)]
        prompt_texts = [p for p in prompts for _ in range(n)]
        with torch.no_grad(), self._ref_model() as ref:
            logp_ref = models.sequence_logp(ref, prompt_ids, prompt_mask, answers, mask)
        if with_graph:
            logp = models.sequence_logp(self.leader, prompt_ids, prompt_mask, answers, mask)
        else:
            with torch.no_grad():
                logp = models.sequence_logp(self.leader, prompt_ids, prompt_mask, answers, mask)
        batch: Dict[str, Any] = {
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "answers": answers, "mask": mask,
            "prompt_text": prompt_texts, "text": texts, "ref_text": ref_texts,
            "length": models.answer_lengths(answers, mask, self.tokenizer.eos_token_id),
            "logp": logp, "kl": (logp.detach() - logp_ref).float(),
            "group": torch.arange(len(prompts), device=self.device).repeat_interleave(n),  # RLOO's baseline per prompt
        }
        batch.update(self._rm_inputs(prompt_texts, texts, "y"))
        batch.update(self._rm_inputs(prompt_texts, ref_texts, "ref"))
        return batch

    def _rm_inputs(self, prompts: Sequence[str], answers: Sequence[str], prefix: str) -> Dict[str, Tensor]:
        enc = models.rm_inputs(self.rm_tokenizer, prompts, answers, self.config.rm_max_length)
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        if not self.head_only:
            return {f"{prefix}_ids": ids, f"{prefix}_mask": mask}
        feats = models.head_features(self.follower, self.head, ids, mask)
        if self.head.bias is not None:  # phi = [w, b]: the bias's "feature" is 1
            feats = torch.cat([feats, torch.ones_like(feats[:, :1])], 1)
        return {f"{prefix}_feats": feats}

    def reward(self, batch: Dict[str, Any], phi: Tensor, which: str = "y") -> Tensor:
        """The RM's reward r_phi of the answers (which='y') or of their reference answers (which='ref')."""
        if self.head_only:  # linear head: phi = [w, b] against [features, 1]; a stack of K phis gives [K, n]
            feats = batch[f"{which}_feats"]
            return feats @ phi if phi.dim() == 1 else phi @ feats.T
        out = self.follower_call(phi, input_ids=batch[f"{which}_ids"], attention_mask=batch[f"{which}_mask"])
        return out.logits.view(-1).float()

    # ----------------------------------------------------------------------------------------------------
    # The game's hooks
    # ----------------------------------------------------------------------------------------------------

    def leader_batch(self) -> Dict[str, Any]:
        """`prompts_per_round` random training prompts, n policy answers each and one reference answer."""
        c = self.config
        idx = torch.randint(len(self.train_prompts), (c.prompts_per_round,)).tolist()
        return self._answers([self.train_prompts[i] for i in idx], c.candidates, with_graph=c.update == "rloo")

    def label(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """The oracle's utility of every answer and of its reference answer, and the RM's target label."""
        gold = self.oracle(batch["prompt_text"], batch["text"]).float().to(self.device)
        gold_ref = self.oracle(batch["prompt_text"], batch["ref_text"]).float().to(self.device)
        if self.config.follower_loss == "bt-hard":
            target = (gold > gold_ref).float() + 0.5 * (gold == gold_ref).float()
        else:
            target = torch.sigmoid(gold - gold_ref)
        return {**batch, "gold": gold, "gold_ref": gold_ref, "target": target}

    def leader_values(self, batch: Dict[str, Any], phi: Tensor) -> Tensor:
        """The RM's reward of each answer, minus kl_coef times its log-ratio to the reference."""
        values = self.reward(batch, phi)
        if self.config.kl_coef:
            values = values - self.config.kl_coef * batch["kl"]
        return values

    def follower_prediction(self, batch: Dict[str, Any], phi: Tensor):
        """(r(y) - r(y_ref), sigmoid of it - label) for BT; (r(y), r(y) - U(y)) for regression."""
        if self.config.follower_loss == "regression":
            r = self.reward(batch, phi)
            return r, r - batch["gold"]
        o = self.reward(batch, phi) - self.reward(batch, phi, "ref")
        return o, torch.sigmoid(o) - batch["target"]

    def follower_losses(self, batch: Dict[str, Any], phi: Tensor) -> Tensor:
        """Per-answer RM loss: BT cross-entropy against the (soft or hard) label, or squared error to U."""
        if self.config.follower_loss == "regression":
            return (self.reward(batch, phi) - batch["gold"]) ** 2
        o = self.reward(batch, phi) - self.reward(batch, phi, "ref")
        return F.binary_cross_entropy_with_logits(o, batch["target"], reduction="none")

    def follower_batch(self) -> Dict[str, Any]:
        """What the leader step chose for the RM: the winners (bestofn) or every candidate (rloo)."""
        return self._follower_data

    def per_sample_grads(self, values: Callable[[Tensor], Tensor], phi: Tensor) -> Tensor:
        """Closed form when only the linear head trains; torch.func per-sample gradients otherwise.

        With a linear head every function of phi the game exposes (reward, reward minus KL, reward margin against
        the reference) is affine in phi, values(phi) = J phi + c, and row i of J is the head's input features of
        the answers that value reads (e.g. f(y_i) - f(y_ref) for the BT margin). J is read off exactly from
        the values at the unit vectors, J[:, k] = values(e_k) - values(0): `reward` takes the stack of probes at
        once, so this is one matmul over the cached features, no backward pass and no loop over candidates.
        """
        if not self.head_only:
            return super().per_sample_grads(values, phi)
        size = phi.shape[0]
        probes = torch.cat([torch.zeros(1, size, dtype=phi.dtype, device=phi.device),
                            torch.eye(size, dtype=phi.dtype, device=phi.device)])
        with torch.no_grad():
            out = values(probes)  # [1 + P, n]: the game's values broadcast over a stack of phis
            if out.dim() != 2 or out.shape[0] != size + 1:  # a value that does not broadcast: map it instead
                out = torch.func.vmap(values)(probes)
        return (out[1:] - out[:1]).T.contiguous()

    def leader_step(self, batch: Dict[str, Any], diagnose: bool = True) -> Dict[str, float]:
        """(b) rloo: the core's policy-gradient step. (a) bestofn: best candidate by score, SFT step on it."""
        if self.config.update == "rloo":
            logs = super().leader_step(batch, diagnose)
            self._follower_data = detach_batch(batch)  # the RM learns from every candidate
            self._remember(self._follower_data, self._follower_data, logs)
            return logs
        # (a) best-of-n: the steering reward (minus the FPO penalty) joins the RM score, the best answer wins
        phi = self.follower_flat().detach()
        detached = detach_batch(batch)
        steering = self.estimator.steer(SteeringProblem(self, batch, detached, phi))
        with torch.no_grad():
            scores = self.leader_values(detached, steering.phi_eval) + self.steering_rewards(detached, steering)
        n = self.config.candidates
        groups = scores.view(-1, n)
        winners = groups.argmax(-1) + torch.arange(groups.shape[0], device=groups.device) * n
        won = select(detached, winners)
        nll = -models.sequence_logp(self.leader, won["prompt_ids"], won["prompt_mask"], won["answers"],
                                    won["mask"], mean=True).mean()
        grads = torch.autograd.grad(nll, self.leader_parameters, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                          for g, p in zip(grads, self.leader_parameters)])
        self.apply_gradient("leader", flat)
        self._follower_data = won
        logs = {k: float(v) for k, v in steering.diagnostics.items()}
        logs["leader/sft_loss"] = nll.item()
        self._remember(detached, won, logs)
        return logs

    def _remember(self, batch: Dict[str, Any], trained_on: Dict[str, Any], logs: Dict[str, float]) -> None:
        """The round's training metrics, measured on this leader step's answers (before the RM update)."""
        phi = self.follower_flat().detach()
        with torch.no_grad():
            r = self.reward(batch, phi)
            margin = r - self.reward(batch, phi, "ref")
            error = self.follower_prediction(batch, phi)[1]
        self._round_logs = {
            **logs,
            "true/utility": batch["gold"].mean().item(),
            "proxy/reward": r.mean().item(),
            "proxy/margin_vs_ref": margin.mean().item(),
            "rm/error_on_policy": error.mean().item(),
            "policy/kl_to_ref": batch["kl"].mean().item(),
            "policy/length": batch["length"].mean().item(),
            "train/gold_trained_on": trained_on["gold"].mean().item(),
        }
        if self.config.oracle == "synthetic":
            self._round_logs["task/bad_words"] = bad_words(batch["text"]).mean().item()

    def round_metrics(self) -> Dict[str, float]:
        """This round's metrics, averaged over processes (so metrics.jsonl and summary.json see all ranks)."""
        metrics = dict(self._round_logs)
        metrics["rm/head_norm"] = self.follower_flat().detach().norm().item()
        c = self.config
        if self.round == 1 or self.round % c.eval_every == 0 or self.round == self.rounds:
            metrics.update(self.evaluate())
        self._local_metrics = metrics
        keys = sorted(metrics)  # every process logs the same keys in the same rounds
        values = self.all_reduce_mean(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64,
                                                   device=self.device))
        return dict(zip(keys, values.tolist()))

    # ----------------------------------------------------------------------------------------------------
    # Evaluation on held-out prompts
    # ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Gold, proxy, their gap, KL to the reference, length and win rate against the reference (judge)."""
        c = self.config
        prompts = self.eval_prompt_list
        batch = self._answers(prompts, c.eval_samples, with_graph=False)
        phi = self.follower_flat().detach()
        gold = self.oracle(batch["prompt_text"], batch["text"]).float()
        proxy = self.reward(batch, phi).cpu()
        proxy_margin = proxy - self.reward(batch, phi, "ref").cpu()
        gold_margin = gold - self.oracle(batch["prompt_text"], batch["ref_text"]).float()
        judged = self.judge(batch["prompt_text"], batch["text"]).float()
        judged_ref = self.judge(batch["prompt_text"], batch["ref_text"]).float()
        metrics = {
            "eval/gold": gold.mean().item(),
            "eval/proxy": proxy.mean().item(),
            "eval/proxy_margin": proxy_margin.mean().item(),
            # soft BT labels train r(y) - r(y_ref) towards U(y) - U(y_ref): the gap is how far the RM overrates
            "eval/gap": (proxy_margin - gold_margin).mean().item(),
            "eval/kl_to_ref": batch["kl"].mean().item(),
            "eval/length": batch["length"].mean().item(),
            "eval/win_rate_vs_ref": win_rate(judged, judged_ref),
        }
        self._eval_answers = [{"prompt": p, "answer": a, "judge": float(j), "gold": float(g)}
                              for p, a, j, g in zip(batch["prompt_text"], batch["text"], judged, gold)]
        self._log_text(batch, gold, proxy)
        return metrics

    def _log_text(self, batch: Dict[str, Any], gold: Tensor, proxy: Tensor) -> None:
        logger = self.logger if self._trainer is not None else None
        if logger is None or self.global_rank != 0 or not hasattr(logger.experiment, "add_text"):
            return
        rows = ["| prompt | answer | gold | proxy |", "|---|---|---|---|"]
        for i in range(min(self.config.text_samples, len(batch["text"]))):
            rows.append(f"| {batch['prompt_text'][i]} | {batch['text'][i]} | {gold[i]:.2f} | {proxy[i]:.2f} |")
        logger.experiment.add_text("samples/eval", "\n".join(rows), global_step=self.round)

    def on_train_end(self) -> None:
        """Write the final policy's held-out answers (for cross-variant win rates) and, in tests, the parameters."""
        if self.global_rank == 0 and self._eval_answers and self._trainer is not None:
            folder = Path(self.trainer.default_root_dir)
            with (folder / "final_answers.jsonl").open("w") as f:
                f.writelines(json.dumps(row) + "\n" for row in self._eval_answers)
        if self.config.dump_state:
            Path(self.config.dump_state).mkdir(parents=True, exist_ok=True)
            state = {"policy": [p.detach().cpu() for p in self.leader_parameters],
                     "rm": self.follower_flat().detach().cpu(), "round": self.round,
                     "local_metrics": dict(getattr(self, "_local_metrics", {})),
                     "world_size": self.trainer.world_size if self._trainer is not None else 1}
            torch.save(state, Path(self.config.dump_state) / f"rank{self.global_rank}.pt")

    # ----------------------------------------------------------------------------------------------------
    # Figures
    # ----------------------------------------------------------------------------------------------------

    @classmethod
    def figures(cls, history: Dict[str, List[float]]) -> Dict[str, Any]:
        """The training metrics against the round, and the held-out evaluations at the rounds they ran."""
        import matplotlib.pyplot as plt

        from stackelberg import plots

        train = [k for k in history if k != "round" and not k.startswith("eval/")]
        evals = [k for k in history if k.startswith("eval/")]
        figures = {"metrics": plots.metric_grid(history, train, title=cls.__name__)}
        if evals:
            cols = min(3, len(evals))
            rows = math.ceil(len(evals) / cols)
            fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
            for ax, key in zip(axes.flat, evals):
                sub = _finite(history, key)
                ax.plot(sub["round"], sub[key], marker="o", ms=3, lw=1)
                ax.set_title(key, fontsize=9)
                ax.set_xlabel("round", fontsize=8)
            for ax in list(axes.flat)[len(evals):]:
                ax.axis("off")
            fig.tight_layout()
            figures["eval"] = fig
        return figures

    @classmethod
    def comparison_figures(cls, groups):
        """Per-metric comparisons, plus one figure with gold utility and proxy reward over rounds per variant."""
        import matplotlib.pyplot as plt

        from stackelberg import plots

        figures = plots.comparison(groups, ["true/utility", "proxy/reward", "policy/kl_to_ref", "task/bad_words"])
        evals = ["eval/gold", "eval/proxy_margin", "eval/gap", "eval/kl_to_ref", "eval/win_rate_vs_ref"]
        for key in evals:
            finite = {label: [_finite(h, key) for h in runs if key in h] for label, runs in groups.items()}
            figures.update(plots.comparison(finite, [key]))
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, key in zip(axes, ("true/utility", "proxy/reward")):
            for label, runs in groups.items():
                plots.mean_band(ax, [_smooth(h, key) for h in runs], key, label)
            ax.set_title(f"{key} (moving average of 25 rounds)")
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        figures["gold_and_proxy"] = fig
        return figures


def _finite(history: Dict[str, List[float]], key: str) -> Dict[str, List[float]]:
    """The rounds at which `key` was measured, and its values there (evaluations run every N rounds)."""
    pairs = [(r, v) for r, v in zip(history.get("round", []), history.get(key, [])) if math.isfinite(v)]
    return {"round": [r for r, _ in pairs], key: [v for _, v in pairs]}


def _smooth(history: Dict[str, List[float]], key: str, width: int = 25) -> Dict[str, List[float]]:
    values = history.get(key, [])
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - width + 1): i + 1] if math.isfinite(v)]
        out.append(sum(window) / len(window) if window else float("nan"))
    return {**history, key: out}


class _Same:
    """A context manager that yields a model unchanged (the non-LoRA reference)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        return False

