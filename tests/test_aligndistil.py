"""AlignDistil (ALGORITHMS.md §5): every §5.7 number, chunking and StreamBP exactness of the objective's
head-hook loss, the state alignment, and frozen teachers."""
import functools

import pytest
import torch

from rlpost.algorithms import aligndistil as ad
from rlpost.batch import hf_decoder, pack
from rlpost.streambp import streamed_decoder
from rollout.types import FinishReason, Group, Sample
from test_streambp import spec_model, true_float64_norms  # noqa: F401 - fixture

Z_DPO, Z_REV, Z_STUDENT = [2.0, 1.0, 0.0], [1.8, 1.1, 0.0], [1.0, 1.0, 0.0]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_the_numbers_of_the_spec():
    z_dpo, z_rev = t(Z_DPO), t(Z_REV)
    assert torch.softmax(z_dpo, -1).tolist() == pytest.approx([0.665241, 0.244728, 0.090031], abs=1e-6)
    assert torch.softmax(z_rev, -1).tolist() == pytest.approx([0.601727, 0.298809, 0.099465], abs=1e-6)
    w = ad.adaptive_weight(z_dpo, z_rev, gamma=10.0)
    assert float(w) == pytest.approx(1.271286, abs=1e-6)                       # 10 * L1 0.127029 + 1e-3
    assert float((torch.softmax(z_dpo, -1) - torch.softmax(z_rev, -1)).abs().sum()) == pytest.approx(0.127029, abs=1e-6)
    assert 0.1 / float(w) == pytest.approx(0.078660, abs=1e-6)
    z_star, _ = ad.teacher_logits(z_dpo, z_rev, "aligndistil", gamma=10.0)
    assert z_star.tolist() == pytest.approx([2.254257, 0.872871, 0.0], abs=1e-6)
    assert torch.softmax(z_star, -1).tolist() == pytest.approx([0.737364, 0.185248, 0.077387], abs=1e-6)
    student = t(Z_STUDENT).requires_grad_()
    assert torch.softmax(student, -1).tolist() == pytest.approx([0.422319, 0.422319, 0.155362], abs=1e-6)
    assert float(ad.reverse_kl(student, z_star)) == pytest.approx(0.220928, abs=1e-6)
    loss, _ = ad.token_loss(student, z_dpo, z_rev, beta=0.1, gamma=10.0)
    assert float(loss) == pytest.approx(0.017378, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.tolist() == pytest.approx([-0.025853, 0.020036, 0.005817], abs=1e-6) and abs(float(grad.sum())) < 1e-12
    theorem1, w1 = ad.teacher_logits(z_dpo, z_rev, "theorem1", w=0.1, z_ref=t([1.5, 1.0, 0.5]))
    assert torch.softmax(theorem1, -1).tolist() == pytest.approx([0.523609, 0.302096, 0.174294], abs=1e-6)
    assert float(w1) == 0.1


def test_the_teacher_diagnostics_and_the_w_cap_by_hand():
    """On the spec's numbers: teacher p* = (0.737364, 0.185248, 0.077387), its top token 0, which the
    DPO model gives 0.665241 and ranks first; L1 0.127029. A cap w_max = 1 < 1.271286 makes
    z* = z_dpo + 1 * (z_dpo - z_rev) = (2.2, 0.9, 0)."""
    import math
    z_dpo, z_rev = t(Z_DPO), t(Z_REV)
    z_star, _ = ad.teacher_logits(z_dpo, z_rev, "aligndistil", gamma=10.0)
    d = ad.teacher_diagnostics(z_star, z_dpo, z_rev)
    p = [0.737364, 0.185248, 0.077387]
    assert float(d["teacher_entropy"]) == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-5)
    assert float(d["p_dpo_of_teacher_top"]) == pytest.approx(0.665241, abs=1e-6)
    assert float(d["teacher_top_in_dpo_top5"]) == 1.0 and float(d["l1"]) == pytest.approx(0.127029, abs=1e-6)
    capped, w = ad.teacher_logits(z_dpo, z_rev, "aligndistil", gamma=10.0, w_max=1.0)
    assert float(w) == 1.0 and capped.tolist() == pytest.approx([2.2, 0.9, 0.0], abs=1e-12)
    assert float(ad.adaptive_weight(z_dpo, z_rev, 10.0, w_max=5.0)) == pytest.approx(1.271286, abs=1e-6)  # under the cap
    # a teacher that extrapolates: the reverse model all but rules out token 6, which DPO ranks last of
    # 7, and a large gamma pushes it to the teacher's top: outside DPO's top 5
    z_dpo7 = t([6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    z_rev7 = t([6.0, 5.0, 4.0, 3.0, 2.0, 1.0, -10.0])
    z_star7, w7 = ad.teacher_logits(z_dpo7, z_rev7, "aligndistil", gamma=1000.0)
    d7 = ad.teacher_diagnostics(z_star7, z_dpo7, z_rev7)
    assert int(z_star7.argmax()) == 6 and float(d7["teacher_top_in_dpo_top5"]) == 0.0
    assert float(d7["p_dpo_of_teacher_top"]) == pytest.approx(1 / sum(math.exp(k) for k in range(7)), rel=1e-12)


def test_teachers_are_constants_and_vocab_is_trimmed():
    z_dpo, z_rev = t(Z_DPO).requires_grad_(), t(Z_REV).requires_grad_()
    loss, _ = ad.token_loss(t(Z_STUDENT).requires_grad_(), z_dpo, z_rev)
    loss.backward()
    assert z_dpo.grad is None and z_rev.grad is None
    a, b = ad.trim_vocab(torch.zeros(2, 5), torch.zeros(2, 3))
    assert a.shape == b.shape == (2, 3)


# --- the objective on the spec's tiny models ------------------------------------------------------

def _objective(mode="aligndistil", states="on_policy"):
    from rlpost.config import load_config
    from rlpost.objectives.aligndistil import AlignDistil
    cfg = load_config(None, ["algorithm=aligndistil", f"aligndistil.mode={mode}", f"aligndistil.states={states}",
                             "train.micro_batch_size=8", "aligndistil.gamma=10"])
    teachers = {"dpo": spec_model(1), "reverse": spec_model(2)}
    if mode != "aligndistil":
        teachers["reference"] = spec_model(3)
    return AlignDistil(cfg, teachers, pad_id=0)


def _groups():
    g = torch.Generator().manual_seed(1)
    samples = []
    for p_len, r_len in ((3, 7), (5, 4), (2, 9)):
        samples.append(Sample(torch.randint(3, 50, (p_len,), generator=g).tolist(),
                              torch.randint(3, 50, (r_len,), generator=g).tolist(), [0.0] * r_len, FinishReason.STOP))
    return [Group(0, "", "", samples)]


def _loss_and_grads(model, objective, decoder, chunk):
    from rlpost.batch import head_outputs
    (mb,) = objective.micro_batches(_groups(), None, 0)
    model.zero_grad()
    loss, _ = objective.loss(mb, head_outputs(model, mb.packed, objective.head(mb), chunk, decoder))
    loss.backward()
    return float(loss), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["aligndistil", "theorem1", "theorem1_adaptive"])
def test_chunked_and_streamed_losses_equal_the_unchunked_one(mode, true_float64_norms):
    """float64: head chunks of 4 (not dividing T = 9) and of T, autograd and StreamBP: loss and every
    student gradient equal to 1e-10; the teachers get no gradient."""
    model, objective = spec_model(0), _objective(mode)
    expected = _loss_and_grads(model, objective, hf_decoder, 9)
    for decoder in (hf_decoder, functools.partial(streamed_decoder, chunk_size=4)):
        for chunk in (4, 9):
            got = _loss_and_grads(model, objective, decoder, chunk)
            assert abs(got[0] - expected[0]) <= 1e-10 * abs(expected[0])
            for g, e in zip(got[1], expected[1]):
                assert float((g - e).norm()) <= 1e-10 * float(e.norm()) + 1e-14
    assert all(p.grad is None for teacher in objective.teachers.values() for p in teacher.parameters())


def test_states_are_s1_to_sT_not_the_released_codes_shifted_ones(true_float64_norms):
    """The objective's loss equals the spec's formula on the logits at positions P-1 .. P+T-2 (the
    states that score the response tokens); the released trainers' window, one position later
    (skipping s_1, adding the post-EOS state), gives another value."""
    from rlpost.batch import head_outputs
    model, objective = spec_model(0), _objective()
    (mb,) = objective.micro_batches(_groups(), None, 0)
    with torch.no_grad():
        ours, _ = objective.loss(mb, head_outputs(model, mb.packed, objective.head(mb), 4))
        packed, T = mb.packed, mb.packed.response_mask.shape[1]
        P = packed.prompt_width

        def full(m):  # the whole-sequence logits, then the spec's formula per window
            return m(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                     position_ids=packed.position_ids).logits

        logits = {"student": full(model), "dpo": full(objective.teachers["dpo"]), "rev": full(objective.teachers["reverse"])}

        def loss_at(offset):
            window = {k: v[:, P - 1 + offset:P - 1 + offset + T] for k, v in logits.items()}
            if window["student"].shape[1] < T:  # the shifted window runs past the end: pad like the released code
                window = {k: torch.nn.functional.pad(v, (0, 0, 0, T - v.shape[1])) for k, v in window.items()}
            token, _ = ad.token_loss(window["student"], window["dpo"], window["rev"], beta=0.1, gamma=10.0)
            mask = packed.response_mask.double()
            return float(((token * mask).sum(-1) / mask.sum(-1)).sum() / 3)

    assert float(ours) == pytest.approx(loss_at(0), rel=1e-10)
    assert abs(loss_at(1) - float(ours)) > 1e-3 * abs(float(ours))


def test_off_policy_states_are_the_preferred_responses():
    objective = _objective(states="off_policy")
    group = _groups()[0]
    for i, s in enumerate(group.samples):
        s.correct = i == 1
    (mb,) = objective.micro_batches([group], None, 0)
    assert mb.packed.response_mask.shape[0] == 1 and int(mb.packed.response_mask.sum()) == 4


def test_teachers_with_another_tokenizer_are_refused(tmp_path):
    from transformers import AutoTokenizer
    from rlpost.config import ConfigError, load_config
    from rlpost.objectives.aligndistil import AlignDistil
    from rollout.models import resolve
    other = AutoTokenizer.from_pretrained(resolve("tiny-random"))
    other.add_tokens(["<extra-token>"])
    folder = tmp_path / "other"
    import shutil
    shutil.copytree(resolve("tiny-random"), folder)
    other.save_pretrained(folder)
    cfg = load_config(None, ["algorithm=aligndistil", "model.name=tiny-random", f"aligndistil.dpo_model={folder}",
                             "aligndistil.reverse_model=tiny-random"])
    with pytest.raises(ConfigError, match="another tokenizer"):
        AlignDistil.frozen_models(cfg)
    with pytest.raises(ConfigError, match="needs aligndistil.dpo_model"):
        AlignDistil.frozen_models(load_config(None, ["algorithm=aligndistil"]))


def test_teachers_then_student_run_end_to_end(tmp_path, digit_model):
    """DPO and reverse DPO on a preference file, then AlignDistil on-policy with them as teachers, on the
    tiny digit model (2 steps each): every stage runs and the student trains."""
    import json
    import subprocess
    import sys
    from conftest import REPO, subprocess_env
    from rlpost.metrics import read_metrics

    pairs = tmp_path / "pairs.jsonl"  # the conversational rows scripts/sample_pairs.py writes
    pairs.write_text("\n".join(json.dumps({
        "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
        "chosen": [{"role": "assistant", "content": str(a + b)}],
        "rejected": [{"role": "assistant", "content": str(a + b + 1)}]}) for a in range(1, 6) for b in range(1, 4)))

    def train(*args):
        proc = subprocess.run([sys.executable, "-m", "rlpost.cli", "train", *args, "--no-progress"], cwd=REPO,
                              capture_output=True, text=True, env=subprocess_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]

    teacher = ["configs/dpo_hh.yaml", "--set", f"model.name={digit_model}", "--set", f"data.source={pairs}",
               "--set", "data.held_out=2", "--set", "train.max_steps=2", "--set", "train.lr=1e-3"]
    train(*teacher, "--set", f"run.output_dir={tmp_path / 'dpo'}")
    train(*teacher, "--set", f"run.output_dir={tmp_path / 'rev'}", "--set", "data.swap_pairs=true")
    train("configs/aligndistil_math.yaml", "--set", f"model.name={digit_model}", "--set", "data.arithmetic.word_problems=false",
          "--set", "data.arithmetic.train_size=40", "--set", "data.arithmetic.test_size=8",
          "--set", "rollout.max_new_tokens=6", "--set", f"run.output_dir={tmp_path / 'student'}",
          "--set", f"aligndistil.dpo_model={tmp_path / 'dpo' / 'checkpoints' / 'latest' / 'hf'}",
          "--set", f"aligndistil.reverse_model={tmp_path / 'rev' / 'checkpoints' / 'latest' / 'hf'}",
          "--set", "train.max_steps=2", "--set", "eval.num_prompts=4", "--set", "eval.every=0")
    rows = [r for r in read_metrics(tmp_path / "student") if "loss" in r]
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    assert {"distil/w_q10", "distil/w_q50", "distil/w_q90", "distil/kl_dpo", "distil/kl_reverse"} <= rows[0].keys()
    # The two teachers are two models (DPO on the pairs and on the swapped pairs), both moved from the
    # start, so w = gamma ||p_dpo - p_rev||_1 + 1e-3 (gamma 15) sits far above its floor: identical
    # teachers give exactly 1e-3 (the same weights give the same logits bit for bit). w > 1 asks for a
    # mean L1 distance > 1/15 (these teachers, trained apart at lr 1e-3, are nearly disjoint: ~29.8);
    # L1 <= 2 caps w at 2 gamma + 1e-3.
    from safetensors.torch import load_file
    dpo, rev = (load_file(tmp_path / t / "checkpoints" / "latest" / "hf" / "model.safetensors") for t in ("dpo", "rev"))
    start = load_file(f"{digit_model}/model.safetensors")
    for teacher in (dpo, rev):
        assert any(not torch.equal(teacher[k], start[k]) for k in start)
    assert any(not torch.equal(dpo[k], rev[k]) for k in dpo)
    assert all(1.0 < r["distil/w_mean"] <= 2 * 15.0 + 1e-3 and r["distil/kl_dpo"] != r["distil/kl_reverse"]
               for r in rows), rows
    # the teacher's diagnostics are logged, each within its range; L1's quantiles are ordered and,
    # as w = 15 L1 + 1e-3 token by token (a monotone map), w's median is 15 x L1's median + 1e-3
    for r in rows:
        assert r["distil/teacher_entropy"] >= 0 and 0 <= r["distil/p_dpo_of_teacher_top"] <= 1
        assert 0 <= r["distil/teacher_top_in_dpo_top5"] <= 1
        assert 0 <= r["distil/l1_q10"] <= r["distil/l1_q50"] <= r["distil/l1_q90"] <= 2
        assert r["distil/w_q50"] == pytest.approx(15.0 * r["distil/l1_q50"] + 1e-3, rel=1e-5)


@pytest.mark.slow
def test_sample_pairs_writes_verifier_pairs_that_load_back(tmp_path, tokenizer):
    """scripts/sample_pairs.py on SmolLM2 (16 word problems x 8 samples): pairs exist, and they load back
    through the dataset source with chosen correct and rejected wrong by the verifier."""
    import subprocess
    import sys
    from conftest import REPO, subprocess_env
    from rewards.math import MathReward
    from rlpost.config import DataConfig
    from rlpost.data import load_response_groups

    out = tmp_path / "pairs.jsonl"
    proc = subprocess.run([sys.executable, "scripts/sample_pairs.py", "configs/aligndistil_math.yaml", "--out", str(out),
                           "--set", "data.arithmetic.train_size=16", "--set", "data.arithmetic.test_size=4",
                           "--set", "rollout.group_size=8"], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env(), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = load_response_groups(DataConfig(source=str(out)), tokenizer)
    assert data.train and not data.skipped
    verifier = MathReward()
    for g in data.train:
        chosen, rejected = g.samples
        assert verifier.check(chosen.text, g.answer)[0] and not verifier.check(rejected.text, g.answer)[0]
    verifier.close()
