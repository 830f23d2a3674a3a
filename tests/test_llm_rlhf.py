"""The LLM game on tiny transformers models: loading through the recipe, the closed-form FPO penalty, a short run
that moves both players, and DDP over two CPU processes.

    pytest tests/test_llm_rlhf.py -q
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from stackelberg.hypergrad import linalg
from stackelberg.recipes import load_recipe
from stackelberg.runner import build_game


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Path:
    """Synthetic policy and RM, briefly pre-trained and saved with save_pretrained (built once per session)."""
    from games.llm_rlhf.task import build_synthetic

    folder = tmp_path_factory.mktemp("llm") / "init"
    info = build_synthetic(folder, steps=40)
    assert 0.5 < info["rm_head_accuracy_on_human_pairs"] <= 1.0
    return folder


def make_game(checkpoints: Path, *overrides: str):
    """The game exactly as `stackelberg run llm/smoke` builds it, on the session's checkpoints."""
    recipe = load_recipe("llm/smoke", [f"game.synthetic_dir={checkpoints}", "game.eval_every=1000", *overrides])
    return build_game(recipe)


def test_recipe_loads_policy_reference_and_rm_from_local_dir(checkpoints):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    game = make_game(checkpoints, f"game.policy={checkpoints / 'policy'}",
                     f"game.reward_model={checkpoints / 'reward_model'}", "game.synthetic_dir=/nonexistent")
    saved_policy = AutoModelForCausalLM.from_pretrained(checkpoints / "policy")
    saved_rm = AutoModelForSequenceClassification.from_pretrained(checkpoints / "reward_model")
    for name, p in saved_policy.state_dict().items():
        assert torch.equal(game.leader.state_dict()[name], p), name
        assert torch.equal(game.reference.state_dict()[name], p), name
    for name, p in saved_rm.state_dict().items():
        assert torch.equal(game.follower.state_dict()[name], p), name
    # only the RM's linear head trains; the reference never does
    assert [n for n, p in game.follower.named_parameters() if p.requires_grad] == ["score.weight"]
    assert not any(p.requires_grad for p in game.reference.parameters())
    assert game.tokenizer("n1 n2")["input_ids"][0] == game.tokenizer.bos_token_id


def test_head_features_reproduce_the_rm_logits(checkpoints):
    from games.llm_rlhf import models

    game = make_game(checkpoints)
    enc = models.rm_inputs(game.rm_tokenizer, ["n1 n2", "n3"], ["g0 b1 n4", "b2"], 64)
    logits = game.follower(**enc).logits.view(-1)
    feats = models.head_features(game.follower, game.head, enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(feats @ game.head.weight.view(-1), logits, atol=1e-5)


@pytest.mark.parametrize("overrides", [(), ("game.update=rloo", "game.kl_coef=0.1"),
                                       ("game.follower_loss=regression",)])
def test_closed_form_per_sample_grads_match_torch_func(checkpoints, overrides):
    game = make_game(checkpoints, *overrides)
    batch = game.label(game.leader_batch())
    phi = game.follower_flat().detach() + 0.1 * torch.randn(game.follower_flat().shape)
    for fn in (lambda p: game.leader_values(batch, p), lambda p: game.follower_prediction(batch, p)[0]):
        closed = game.per_sample_grads(fn, phi)
        reference = linalg.per_sample_grads(fn, phi)
        assert closed.shape == reference.shape == (batch["gold"].shape[0], phi.shape[0])
        assert torch.allclose(closed, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["practical", "relaxed"])
def test_closed_form_fpo_penalty_matches_torch_func_penalty(checkpoints, variant):
    from stackelberg.game import LeaderFollowerGame, detach_batch
    from stackelberg.hypergrad.base import SteeringProblem

    game = make_game(checkpoints, f"estimator.variant={variant}")
    batch = game.label(game.leader_batch())
    problem = SteeringProblem(game, batch, detach_batch(batch), game.follower_flat().detach())
    closed = game.estimator.steer(problem).penalty
    game.per_sample_grads = lambda values, phi: LeaderFollowerGame.per_sample_grads(game, values, phi)
    generic = game.estimator.steer(problem).penalty
    assert closed.abs().sum() > 0
    assert torch.allclose(closed, generic, atol=1e-6, rtol=1e-4)


def _flat(params):
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


@pytest.mark.parametrize("overrides", [(), ("game.update=rloo", "game.kl_coef=0.05"),
                                       ("game.update=rloo", "estimator.name=implicit-cg", "estimator.damping=0.1"),
                                       ("game.follower_loss=bt-hard", "estimator.name=unrolled")])
def test_short_run_moves_both_players_and_metrics_are_finite(checkpoints, overrides):
    game = make_game(checkpoints, "game.eval_every=2", *overrides)
    policy0, rm0 = _flat(game.leader_parameters), _flat(game.follower_parameters)
    history = game.play(2)
    assert not torch.equal(policy0, _flat(game.leader_parameters))
    assert not torch.equal(rm0, _flat(game.follower_parameters))
    for row in history:
        assert all(math.isfinite(v) for v in row.values()), row
    for key in ("true/utility", "proxy/reward", "policy/kl_to_ref", "rm/error_on_policy", "eval/gold",
                "eval/win_rate_vs_ref", "eval/gap"):
        assert key in history[-1]
    # the frozen reference did not move
    assert torch.equal(_flat(game.reference.parameters()), policy0)


def test_whole_rm_training_uses_torch_func_per_sample_grads(checkpoints):
    game = make_game(checkpoints, "game.rm_train=all")
    assert len(game.follower_parameters) > 1
    batch = game.label(game.leader_batch())
    rows = game.per_sample_grads(lambda p: game.leader_values(batch, p), game.follower_flat().detach())
    assert rows.shape == (batch["gold"].shape[0], game.follower_flat().shape[0])
    rm0 = _flat(game.follower_parameters)
    history = game.play(1)
    assert math.isfinite(history[-1]["fpo/penalty"])
    assert not torch.equal(rm0, _flat(game.follower_parameters))


def test_win_rates_between_runs(tmp_path):
    import json

    from games.llm_rlhf.compare import win_rates

    for name, answers in (("a", ["g0 g1", "g2"]), ("b", ["b0", "g2"])):
        run = tmp_path / name / "seed_0"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"name: {name}\n")
        rows = [{"prompt": "n1", "answer": a, "judge": float(a.count("g") - a.count("b"))} for a in answers]
        (run / "final_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rates = win_rates([tmp_path])["win_rates"]
    assert rates["a vs b"] == pytest.approx(0.75) and rates["b vs a"] == pytest.approx(0.25)
    assert win_rates([tmp_path], judge="synthetic")["win_rates"]["a vs b"] == pytest.approx(0.75)


def test_ddp_two_processes_end_identical_with_reduced_metrics(checkpoints, tmp_path):
    import json

    from conftest import run_cli

    dump, run = tmp_path / "dump", tmp_path / "run"
    result = run_cli("run", "llm/smoke", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                     "rounds=3", "game.eval_every=3", f"game.synthetic_dir={checkpoints}",
                     f"game.dump_state={dump}", f"output_dir={run}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["round"] == 3 for r in ranks)
    for a, b in zip(ranks[0]["policy"], ranks[1]["policy"]):
        assert torch.equal(a, b)
    assert torch.equal(ranks[0]["rm"], ranks[1]["rm"])
    # the ranks sampled their own answers, and what was logged is the mean over both
    local = [r["local_metrics"] for r in ranks]
    final = json.loads((run / "summary.json").read_text())["final"]
    differing = [k for k in local[0] if local[0][k] != local[1][k]]
    assert differing, "both ranks measured the same numbers: they did not sample independently"
    for key in differing:
        assert final[key] == pytest.approx((local[0][key] + local[1][key]) / 2, rel=1e-6, abs=1e-6)
    assert (run / "final_answers.jsonl").is_file()


def test_lora_policy_encoder_rm_and_reference_oracle(checkpoints, tmp_path):
    """The GPU recipe's code paths on tiny models: LoRA policy (reference = adapters off), an encoder RM whose
    head has a bias (deberta), the paper's reference log-likelihood oracle."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from games.llm_rlhf.task import PAD, VOCAB, make_tokenizer

    config = DebertaV2Config(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, pooler_hidden_size=16, num_labels=1, pad_token_id=PAD,
                             max_position_embeddings=64)
    DebertaV2ForSequenceClassification(config).save_pretrained(tmp_path / "deberta")
    make_tokenizer("reward").save_pretrained(tmp_path / "deberta")
    game = make_game(checkpoints, f"game.reward_model={tmp_path / 'deberta'}", "game.lora=true", "game.lora_r=4",
                     "game.lora_alpha=8", "game.oracle=ref-loglik", "game.judge=ref-loglik", "game.eval_every=2",
                     "estimator.variant=practical")
    assert game.reference is None and game.head.bias is not None
    assert all("lora" in n for n, p in game.leader.named_parameters() if p.requires_grad)
    batch = game.label(game.leader_batch())
    assert batch["y_feats"].shape[1] == 17  # 16 features and the bias's constant 1
    assert ((batch["gold"] >= -15) & (batch["gold"] <= 5)).all()
    fn = lambda p: game.follower_prediction(batch, p)[0]  # noqa: E731
    phi = game.follower_flat().detach()
    assert torch.allclose(game.per_sample_grads(fn, phi), linalg.per_sample_grads(fn, phi), atol=1e-5)
    lora0, rm0 = _flat(game.leader_parameters), _flat(game.follower_parameters)
    history = game.play(2)
    assert not torch.equal(lora0, _flat(game.leader_parameters))
    assert not torch.equal(rm0, _flat(game.follower_parameters))
    assert all(math.isfinite(v) for v in history[-1].values())
    assert history[0]["policy/kl_to_ref"] == pytest.approx(0.0, abs=1e-5)  # LoRA starts as the identity


def test_resume_follows_the_uninterrupted_trajectory(checkpoints, tmp_path):
    from stackelberg import runner

    common = [f"game.synthetic_dir={checkpoints}", "game.eval_every=2", "trainer.rounds_per_epoch=2"]
    runner.run("llm/smoke", [*common, "rounds=3", f"output_dir={tmp_path / 'straight'}"], quiet=True)
    runner.run("llm/smoke", [*common, "rounds=2", f"output_dir={tmp_path / 'resumed'}"], quiet=True)
    runner.resume(str(tmp_path / "resumed"), ["rounds=3"], quiet=True)
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    resumed = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(straight) == 3 and straight == resumed


def test_prompts_from_jsonl_or_text(tmp_path):
    from games.llm_rlhf.game import read_prompts

    (tmp_path / "p.jsonl").write_text('{"prompt": "n1 n2"}\n\n{"prompt": "n3"}\n')
    (tmp_path / "p.txt").write_text("n1 n2\nn3\n")
    assert read_prompts(str(tmp_path / "p.jsonl")) == read_prompts(str(tmp_path / "p.txt")) == ["n1 n2", "n3"]
    assert len(read_prompts("synthetic_eval.jsonl")) == 32  # a bare name reads the package's data folder
    with pytest.raises(ValueError, match="prompt file not found"):
        read_prompts(str(tmp_path / "missing.jsonl"))


def test_rloo_baseline_is_taken_among_the_answers_to_one_prompt(checkpoints, monkeypatch):
    import stackelberg.game as game_module

    game = make_game(checkpoints, "game.update=rloo", "estimator.name=fpo")
    seen = []
    real = game_module.leave_one_out
    monkeypatch.setattr(game_module, "leave_one_out", lambda values, groups=None: seen.append(groups) or
                        real(values, groups))
    game.play(1)
    n, prompts = game.config.candidates, game.config.prompts_per_round
    assert seen and all(g is not None and g.tolist() == [i // n for i in range(n * prompts)] for g in seen)
