"""The vLLM engine against transformers: log-probs, weight sync after a learner step, abort.
Skipped where vllm does not import (install: RLPOST_VLLM=1 scripts/setup.sh)."""
import pytest
import torch

from rollout import vllm_engine
from rollout.types import FinishReason, SamplingParams
from test_streambp import true_float64_norms  # noqa: F401 - fixture: the float64 truth is float64 throughout


@pytest.fixture(autouse=True)
def _vllm_installed():
    """Skip only where vllm is not installed (ImportError); a broken install raises from available()
    and fails. With RLPOST_REQUIRE_ALL=1 (CI) a missing vllm fails too."""
    from conftest import skip_unless_required
    if not vllm_engine.available():
        skip_unless_required("vllm is not installed")


@pytest.fixture(scope="module")
def engine():
    from rollout.models import load_tokenizer, resolve
    return vllm_engine.VLLMEngine(resolve("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct"),
                                  max_batch_size=16, max_model_len=512)


def _prompts(tokenizer, n=4):
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} * 7?"}],
                                               add_generation_prompt=True, tokenize=True)["input_ids"])
            for a in range(n)]


def test_logprobs_match_a_transformers_forward(engine, true_float64_norms):
    """Behaviour log-probs of the sampled tokens (temperature 0.7) = log softmax(logits / 0.7) over
    the same tokens. Truth: transformers' float64 forward. vLLM runs float32 with its own kernels, so
    it is held to what float32 itself allows here: 4x the distance of transformers' own float32
    forward from the float64 one (two float32 evaluations of the same sums, each within that distance
    of the truth, reordering at most doubling the rounding: 2x, and 2x headroom, as for StreamBP),
    with a floor of 64 float32 ulps of the largest |log-prob| (a lucky, nearly exact float32 run is
    not a property of the arithmetic). A wrong temperature or an off-by-one token is off by O(0.1)."""
    from rollout.models import load_model
    model = load_model("smollm2-135m-instruct").eval()
    model64 = load_model("smollm2-135m-instruct", dtype=torch.float64).eval()

    def logprobs(m, ids, prompt, response):
        with torch.no_grad():
            logits = m(ids).logits[0, len(prompt) - 1:-1].double() / 0.7
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)

    for prompt, sample in zip(_prompts(engine.tokenizer, 2), engine.generate(_prompts(engine.tokenizer, 2),
                                                                            SamplingParams(24, 0.7, seed=0))):
        ids = torch.tensor([prompt + sample.response_ids])
        assert len(sample.logprobs) == len(sample.response_ids) == len(sample.versions) > 0
        truth = logprobs(model64, ids, prompt, sample.response_ids)
        float32_error = float((logprobs(model, ids, prompt, sample.response_ids) - truth).abs().max())
        floor = 64 * torch.finfo(torch.float32).eps * float(truth.abs().max().clamp(min=1.0))
        vllm_error = float((torch.tensor(sample.logprobs, dtype=torch.float64) - truth).abs().max())
        assert vllm_error <= 4 * max(float32_error, floor), (vllm_error, float32_error, floor)


def test_greedy_equals_the_learners_model_after_a_step_and_sync(engine):
    """One learner step (lr 1e-3, so greedy answers move), weights synced in place: vLLM's greedy
    generations equal greedy generation with the learner's own model."""
    from rlpost.config import load_config
    from rlpost.learner import Learner
    from rlpost.objectives.grpo import GRPO
    from rollout.hf_engine import HFEngine
    from rollout.types import Group

    cfg = load_config(None, ["model.name=smollm2-135m-instruct", "train.lr=1e-3", "train.micro_batch_size=8"])
    learner = Learner(cfg.model.name, cfg.train)
    prompts = _prompts(engine.tokenizer)
    greedy = SamplingParams(16, 0.0)
    before = engine.generate(prompts, greedy)
    samples = engine.generate(prompts * 2, SamplingParams(16, 1.0))  # no per-request seed: members differ
    for i, s in enumerate(samples):
        s.reward = float(i < 4)  # first member of each group right, second wrong: advantages != 0
    groups = [Group(k, "", "", [samples[k], samples[k + 4]]) for k in range(4)]
    objective = GRPO(cfg, {}, engine.tokenizer.pad_token_id)
    learner.train_step(objective.micro_batches(groups, objective.advantages(groups), 0), objective.head, objective.loss)
    engine.load_weights(learner.named_weights(), learner.version)
    after = engine.generate(prompts, greedy)
    reference = HFEngine(learner.model, engine.tokenizer).generate(prompts, greedy)
    assert [s.response_ids for s in after] == [s.response_ids for s in reference]
    assert [s.response_ids for s in after] != [s.response_ids for s in before]  # the step changed something
    assert all(s.versions == [learner.version] * len(s.response_ids) for s in after)


def test_lora_sync_of_the_adapted_modules_then_greedy_equals_the_learners(engine):
    """LoRA on q_proj, v_proj and down_proj: the sync sends W + (alpha / r) B A of those 90 modules only.
    vLLM fuses q/k/v into one qkv_proj, so on CPU (where it repacks weights and frees the originals) the
    k shard it is not sent is read back from the model folder. After one step (lr 1e-2, so greedy answers
    move) vLLM's greedy answers equal greedy generation with the learner's own peft model."""
    from rlpost.config import load_config
    from rlpost.learner import Learner
    from rlpost.objectives.grpo import GRPO
    from rollout.hf_engine import HFEngine
    from rollout.models import load_model
    from rollout.types import Group

    engine.load_weights(load_model("smollm2-135m-instruct").named_parameters(), 0)  # undo the full-FT test's step
    cfg = load_config(None, ["model.name=smollm2-135m-instruct", "train.lr=1e-2", "train.micro_batch_size=8",
                             "model.lora.r=8", "model.lora.target_modules=[q_proj, v_proj, down_proj]"])
    learner = Learner(cfg.model.name, cfg.train, lora=cfg.model.lora)
    prompts = _prompts(engine.tokenizer)
    greedy = SamplingParams(16, 0.0)
    before = engine.generate(prompts, greedy)
    samples = engine.generate(prompts * 2, SamplingParams(16, 1.0))
    for i, s in enumerate(samples):
        s.reward = float(i < 4)
    groups = [Group(k, "", "", [samples[k], samples[k + 4]]) for k in range(4)]
    objective = GRPO(cfg, {}, engine.tokenizer.pad_token_id)
    learner.train_step(objective.micro_batches(groups, objective.advantages(groups), 0), objective.head, objective.loss)
    named = list(learner.named_weights())
    assert len(named) == 90 and all(n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for n, _ in named)
    engine.load_weights(named, learner.version)
    after = engine.generate(prompts, greedy)
    reference = HFEngine(learner.model, engine.tokenizer).generate(prompts, greedy)
    assert [s.response_ids for s in after] == [s.response_ids for s in reference]
    assert [s.response_ids for s in after] != [s.response_ids for s in before]


def test_abort_returns_the_partial_tokens(engine):
    prompt = _prompts(engine.tokenizer, 1)[0]
    (whole,) = engine.generate([prompt], SamplingParams(20, 0.0))
    engine.add_request("partial", prompt, SamplingParams(20, 0.0))
    for _ in range(3):
        assert engine.step() == [] or len(whole.response_ids) <= 3
    partial = engine.abort("partial")
    assert partial.finish_reason == FinishReason.ABORT
    assert 0 < len(partial.response_ids) < len(whole.response_ids)
    assert partial.response_ids == whole.response_ids[:len(partial.response_ids)]
    assert len(partial.logprobs) == len(partial.response_ids)
    assert partial.finished_at is None and whole.finished_at is not None  # an aborted sample has not finished
    # resume from the token ids: prefix + continuation = the uninterrupted answer
    rest = engine.generate([prompt + partial.response_ids],
                           SamplingParams(20 - len(partial.response_ids), 0.0))[0]
    assert partial.response_ids + rest.response_ids == whole.response_ids


def test_a_seeded_call_samples_each_request_apart_and_repeats(engine):
    """vLLM seeds each request on its own: one seeded call with a prompt repeated (a group) must still
    give independent samples (the same seed everywhere made them identical), and the same call again
    the same samples."""
    prompt = list(engine.tokenizer.apply_chat_template([{"role": "user", "content": "Write a poem about the sea."}],
                                                       add_generation_prompt=True, tokenize=True)["input_ids"])
    params = SamplingParams(24, 1.0, seed=7)
    first = [s.response_ids for s in engine.generate([prompt] * 4, params)]
    again = [s.response_ids for s in engine.generate([prompt] * 4, params)]
    assert len({tuple(r) for r in first}) > 1
    assert again == first


def test_a_kv_cache_sized_from_the_job_serves_it(engine):
    """cpu_kv_cache_gib None: the cache max_batch_size sequences of max_model_len need. SmolLM2-135M
    has 30 layers of 3 KV heads of dimension 64: a float32 key and value per token are
    2 * 30 * 3 * 64 * 4 = 46,080 bytes, and a sequence takes whole blocks of 256 tokens. An engine
    with that cache (4 sequences of 128 tokens: 45 MiB instead of the fixed 2 GiB) answers as the
    base model does under transformers (the module's engine may hold trained weights by now)."""
    from rollout.hf_engine import HFEngine
    from rollout.models import load_model, resolve
    path = resolve("smollm2-135m-instruct")
    assert vllm_engine.kv_cache_bytes(path, 4, 128) == 4 * 256 * 46_080
    assert vllm_engine.kv_cache_bytes(path, 4, 257) == 4 * 512 * 46_080
    small = vllm_engine.VLLMEngine(path, engine.tokenizer, max_batch_size=4, max_model_len=128, cpu_kv_cache_gib=None)
    prompts = _prompts(engine.tokenizer, 4)
    greedy = SamplingParams(20, 0.0)
    reference = HFEngine(load_model("smollm2-135m-instruct"), engine.tokenizer).generate(prompts, greedy)
    assert [s.response_ids for s in small.generate(prompts, greedy)] == [s.response_ids for s in reference]
