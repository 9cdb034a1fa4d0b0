"""Typed configuration: one YAML file -> one tree of pydantic objects. Unknown keys are errors.

`load_config(path, overrides)` applies `--set a.b=value` overrides (values parsed as YAML) and raises
ConfigError with one line naming the offending key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from rollout.types import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(UserError):
    """Bad user input in a config file or override; the CLI prints it as one line and exits 2."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    output_dir: str = "runs/default"  # metrics, TensorBoard, checkpoints
    seed: int = 0                            # seeds Python/NumPy/torch, vLLM, the samplers, the data (arithmetic, held_out)


class LoraConfig(Section):
    """LoRA adapters through peft (docs/lora.md): W x + (alpha / r) B A x on the targeted modules; only A
    and B train, and the frozen base W is the reference wherever that is the initial policy."""
    r: int = Field(16, ge=1)                 # the adapters' rank (A is [r, d_in], B is [d_out, r], B = 0 at the start)
    alpha: float = Field(32.0, gt=0)         # the update is scaled by alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the adapters' input; 0 keeps StreamBP and resume exact
    # module names (a name matches a module whose path ends with it, as in peft) that get adapters;
    # "all-linear": every linear layer of the decoder (not the output head)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class ModelConfig(Section):
    name: str = "smollm2-135m-instruct"  # hub id, local dir, smollm2-135m-instruct or tiny-random
    lora: LoraConfig | None = None       # null: full fine-tuning; else LoRA adapters (e.g. --set model.lora.r=16)


class ArithmeticConfig(Section):
    digits: int = Field(1, ge=1, le=6)           # operands have up to this many digits
    num_operations: int = Field(1, ge=1, le=4)   # operations per problem
    operations: list[Literal["+", "-", "*"]] = ["+", "-"]  # each operation is drawn from these
    word_problems: bool = False                  # story text around the numbers instead of "What is a + b?"
    train_size: int = Field(2000, ge=1)      # training problems (fewer if not that many distinct ones exist)
    test_size: int = Field(200, ge=1)        # held-out problems, disjoint from the training ones
    seed: int | None = None                      # the problems' seed; None: run.seed (pin it to compare run seeds on the same data)


class DataConfig(Section):
    source: str = "arithmetic"          # "arithmetic", a .jsonl/.json/.parquet file, a folder, or a hub id
    test_source: str | None = None      # held-out file when `source` is a file; else the test split
    train_split: str = "train"               # hub dataset split to train on
    test_split: str = "test"                 # hub dataset split to evaluate on
    question_field: str = "question"         # row field holding the question
    answer_field: str = "answer"             # row field holding the reference answer
    answer_format: Literal["plain", "gsm8k"] = "plain"  # gsm8k: the answer follows "#### "
    system_prompt: str | None = None    # None keeps the chat template's default system message
    prompt_template: str = "{question}"      # the user message; {question} is replaced by the question
    max_train_prompts: int | None = Field(None, ge=1)  # the first N training prompts only; None: all
    max_test_prompts: int | None = Field(None, ge=1)  # the first N held-out prompts only; None: all
    max_prompt_tokens: int = Field(1024, ge=1)  # longer prompts (chat template included) are skipped, counted
    # Fixed-response files (rollout.scheduler=dataset): a longer prompt keeps its last max_prompt_tokens
    # tokens (the turns nearest the answer), a longer response its first max_response_tokens; counted.
    max_response_tokens: int = Field(512, ge=1)
    held_out: int = Field(0, ge=0)      # rows of a fixed-response source held out for eval (seeded), without test_source
    swap_pairs: bool = False            # train on rejected over chosen (the reverse DPO model of AlignDistil)
    # [start, stop]: only rows start..stop-1 of `source` (file order, before anything is skipped or
    # held out), e.g. two halves of one file for two reward models; test_rows the same for the held-out
    # file (test_source, or source itself when test_source is unset).
    rows: tuple[int, int] | None = None
    test_rows: tuple[int, int] | None = None
    # What a prompt row is. question: `question_field` holds the question (a string) and `answer_field`
    # the reference answer. pairs: the prompt of a preference row (`prompt` + chosen/rejected, or an
    # Anthropic HH pair of whole conversations cut before the last assistant turn), as chat
    # messages, with no reference answer (reward.functions / reward.models score it).
    prompts_from: Literal["question", "pairs"] = "question"
    # Anthropic HH rows ("\n\nHuman: ... \n\nAssistant: ..." strings) as fixed responses. text: as
    # written; messages: parsed into user/assistant chat messages and rendered with the chat template,
    # as a chat model generates them (and as reward.models scores them).
    hh_format: Literal["text", "messages"] = "text"
    arithmetic: ArithmeticConfig = ArithmeticConfig()  # the built-in problems (source: arithmetic)

    @model_validator(mode="after")
    def _row_ranges(self) -> "DataConfig":
        for key in ("rows", "test_rows"):
            span = getattr(self, key)
            if span is not None and not 0 <= span[0] < span[1]:
                raise ValueError(f"data.{key} must be [start, stop] with 0 <= start < stop, got {list(span)}")
        return self


class RolloutConfig(Section):
    engine: Literal["hf", "vllm", "auto"] = "hf"  # hf: transformers; vllm: in-process vLLM; auto: vllm if it imports
    prompts_per_step: int = Field(8, ge=1)   # B: groups per step
    group_size: int = Field(8, ge=2)         # G: samples per prompt
    max_new_tokens: int = Field(64, ge=1)    # L_max
    temperature: float = Field(1.0, gt=0)    # sampling temperature (rollouts, pass@k); GRPO's log-probs use it
    top_p: float = Field(1.0, gt=0, le=1)    # nucleus sampling (rollouts, pass@k)
    max_batch_size: int = Field(64, ge=1)    # sequences generated at once
    # The rollout source (rollout/source.py). sync: generate every group of the step to the end.
    # april: active partial rollouts (rollout/april.py): submit `april_submit_groups` groups (N',
    # default 2 * prompts_per_step), train on the first prompts_per_step kept groups that finish,
    # keep the rest for the next step. dataset: fixed responses read from data.source (no engine
    # calls in training; rows with prompt + chosen/rejected, completion or completions).
    scheduler: Literal["sync", "april", "dataset"] = "sync"
    april_submit_groups: int | None = Field(None, ge=1)  # N' under april; None: 2 * prompts_per_step
    # under april with a filter (dynamic sampling, grpo.accuracy_range): at most this many waves of N'
    # a step, then the step trains on the groups kept so far, fewer than prompts_per_step (counted as
    # april/waves_capped). None: no bound, as the reference (a policy that gets every prompt right
    # then makes a step never end).
    april_max_waves: int | None = Field(10, ge=1)
    tokens_per_step: int = Field(8, ge=1)    # hf engine under APRIL: tokens per streaming step
    # hf engine: rows that repeat a prompt (a group) prefill it once and share its KV cache (the same
    # arithmetic, other rounding: docs/training.md#shared-prompts); vLLM runs without prefix caching
    share_prompts: bool = True
    # vLLM engine: the longest prompt + response it serves (None: the job's longest prompt, at most
    # data.max_prompt_tokens, + the longest generation, training or eval), the share of GPU memory it
    # may take (the learner shares the GPU), and on CPU the GiB of KV cache (None: what max_batch_size
    # sequences of that length need; the VLLM_CPU_KVCACHE_SPACE environment variable wins when set).
    vllm_max_model_len: int | None = Field(None, ge=16)
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1)  # share of GPU memory vLLM may take
    vllm_cpu_kv_cache_gib: float | None = Field(None, gt=0)  # GiB of vLLM KV cache on CPU; None: sized from the job
    # Where the engine runs (rollout/workers.py, docs/rollout.md#rollout-workers). colocated: in the
    # learner's process, rollout then train. workers: `workers` processes per learner rank, each with
    # its own engine, generating up to `max_staleness` policy versions ahead of the learner (0:
    # synchronous through the workers); their weights arrive over gloo while they generate. With
    # scheduler april and max_staleness >= 1 APRIL's unfinished requests keep running across updates.
    placement: Literal["colocated", "workers"] = "colocated"
    workers: int = Field(1, ge=1)            # rollout worker processes per learner rank
    worker_devices: list[str] | None = None  # one device per worker, e.g. [cuda:1]; None: cpu for all
    worker_threads: int | None = Field(None, ge=1)   # torch threads per worker (CPU); None: cores / (workers + 1)
    learner_threads: int | None = Field(None, ge=1)  # torch threads of the learner with workers; None: the cores left
    max_staleness: int = Field(0, ge=0)      # k: train on no token sampled more than k versions ago
    worker_timeout_s: float = Field(600.0, gt=0)  # a worker with work that is silent this long is hung
    restart_workers: bool = False            # a dead or hung worker: start it again (true) or stop the run
    seed_requests: bool = False              # colocated sync: seed each step's generation (workers always do)
    # hf engine, colocated: generate from the learner's own module, so there is no second copy of the
    # weights and nothing to sync after a step (not under ZeRO-3, where the learner holds shards).
    # null: wherever that works (engine hf, placement colocated, not ZeRO-3, an objective that samples
    # from the model it trains), a copy elsewhere; true: required (an error where it cannot work)
    shared_model: bool | None = None


class CurriculumConfig(Section):
    """Prompt sampling (ALGORITHMS.md §3). The rollout budget per step is prompts_per_step * group_size."""
    sampler: Literal["uniform", "cures"] = "uniform"  # uniform: shuffled epochs; cures: CurES
    tau_mode: Literal["fixed", "code"] = "fixed"   # code: the released tau_i = 100 (a_i + 1)
    tau: float = Field(0.1, gt=0)                   # softmax temperature of the fixed mode
    allocation: Literal["score", "grad_norm"] = "score"  # k_i ~ s(p) or ~ sigma_i from gradient norms
    k_min: int = Field(2, ge=2)                     # samples per selected prompt, at least
    init_rollouts: int = Field(4, ge=0)             # N_min per training prompt before step 1; 0 skips


class RewardFunctionConfig(Section):
    """One reward function in TRL's convention (rewards/functions.py)."""
    fn: str                                  # "package.module:name" or "path/to/file.py:name" (relative: to the config's folder)
    weight: float = 1.0                      # its weight in the shaped reward (a weighted sum)
    name: str | None = None                  # the metric reward/NAME and what correct_from names; default: the function's name
    isolate: bool = True                     # run it in a killable worker process under timeout_s; false: in-process, no limit


class RewardModelConfig(Section):
    """A trained reward model as a reward (rewards/reward_model.py)."""
    model: str                               # AutoModelForSequenceClassification, one label: hub id, folder or rlpost checkpoint
    weight: float = 1.0                      # its weight in the shaped reward
    batch_size: int = Field(8, ge=1)         # completions scored per forward
    name: str | None = None                  # the metric reward/NAME; default: rm (rm_1, rm_2, ... with several)


class RewardConfig(Section):
    """Outcome reward and its shaping. `correct` (what CurES and the accuracy metric count) is the
    verifier's verdict alone; the shaped reward adds the bonus and the penalty below. With
    `functions` and / or `models`, the user's reward functions and reward models replace the math
    verifier: the shaped reward is their weighted sum, the verdict `correct_from` >= `correct_threshold`."""
    timeout_s: float = Field(5.0, gt=0)      # per-answer limit for math-verify; per call for an isolated reward function
    format_weight: float = 0.0               # bonus for a response that stops by itself with an answer (math verifier only)
    overlong_penalty: bool = False           # DAPO soft length penalty added to the reward
    overlong_cache: int = Field(16, ge=1)    # L_cache of that penalty
    functions: list[RewardFunctionConfig] | None = None  # reward functions (TRL's convention); null: the math verifier
    models: list[RewardModelConfig] | None = None  # reward models, summed with the functions by weight
    correct_from: str | None = None          # the function (or model) whose value is the verdict; default: the only one
    correct_threshold: float = 1.0           # correct = that function's value >= this
    on_error: Literal["raise", "zero"] = "raise"  # a failing function: stop the run with one line, or score 0 and count it

    @model_validator(mode="after")
    def _functions(self) -> "RewardConfig":
        if self.functions is None and self.models is None:
            return self
        names = self.scorer_names()
        if not names:
            raise ValueError("reward.functions / reward.models: give at least one, or leave both null for the math verifier")
        if len(set(names)) < len(names):
            raise ValueError(f"reward.functions: two scorers are named alike ({', '.join(names)}); set name: on one")
        if self.correct_from is None and len(names) > 1:
            raise ValueError(f"reward.correct_from: name the scorer whose value is the verdict (one of {', '.join(names)})")
        if self.correct_from is not None and self.correct_from not in names:
            raise ValueError(f"reward.correct_from: {self.correct_from!r} is none of the scorers ({', '.join(names)})")
        if self.format_weight:
            raise ValueError("reward.format_weight is the math verifier's bonus; with reward.functions write it as a function")
        return self

    @property
    def user_scorers(self) -> bool:
        return self.functions is not None or self.models is not None

    def scorer_names(self) -> list[str]:
        """The functions' then the models' names, as metrics and correct_from know them."""
        models = self.models or []
        return ([f.name or f.fn.rpartition(":")[2] for f in self.functions or []] +
                [m.name or ("rm" if len(models) == 1 else f"rm_{i + 1}") for i, m in enumerate(models)])


class GRPOConfig(Section):
    scale_rewards: Literal["group", "batch", "none"] = "group"  # std normalisation of advantages (ALGORITHMS.md §1.3)
    aggregation: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"  # loss aggregation over tokens (ALGORITHMS.md §1.3)
    eps_low: float = Field(0.2, ge=0)        # ratio clipped below at 1 - eps_low (must be < 1)
    eps_high: float = Field(0.28, ge=0)      # ratio clipped above at 1 + eps_high (DAPO clip-higher)
    beta: float = Field(0.0, ge=0)           # k3 KL coefficient; > 0 loads the reference model
    ratio_level: Literal["token", "sequence"] = "token"  # sequence: one ratio per response, exp(mean log-ratio) (GSPO)
    dynamic_sampling: bool = True            # drop groups whose rewards are all equal
    mask_truncated: bool = False             # truncated responses contribute no loss tokens
    reference: str | None = None             # KL reference model; default model.name; loaded only if beta > 0
    # Tokens sampled by an older policy (APRIL resumes, rollout workers): ignore, mask them out of the
    # loss, weight the policy-gradient term by the truncated importance weight min(pi / pi_behaviour,
    # tis_cap), or (icepop) mask every token whose ratio pi / pi_behaviour lies outside [1/c, c].
    off_policy: Literal["ignore", "mask_stale", "tis", "icepop"] = "ignore"
    tis_cap: float = Field(2.0, gt=0)        # C of off_policy=tis
    icepop_cap: float = Field(2.0, gt=1)     # c of off_policy=icepop
    # keep only groups whose share of correct answers lies in [low, high] (PRIME's [0.2, 0.8]); null: all
    accuracy_range: tuple[float, float] | None = None


class DPOConfig(Section):
    beta: float = Field(0.1, gt=0)           # KL strength: the implicit reward is beta (log pi - log pi_ref)
    pairs_per_group: int = Field(1, ge=1)    # correct-over-incorrect pairs taken from each group, at most
    reference: str | None = None             # frozen reference model; default model.name


class APOConfig(Section):
    """APO (ALGORITHMS.md §4): DPO in rounds; the reference of round t+1 extrapolates pi_t -> pi_(t+1)."""
    beta: float = Field(0.1, gt=0)           # DPO's beta in each round
    alpha: float = Field(0.3, ge=0)          # Nesterov momentum of the reference; 0 is iterative DPO
    steps_per_round: int = Field(4, ge=1)    # optimizer steps on one round's pairs (each a pass over all of them)
    pairs_per_group: int = Field(2, ge=1)    # correct-over-incorrect pairs taken from each group, at most


class PRMConfig(Section):
    """Implicit PRM training (ALGORITHMS.md §6): r(y) = beta (log pi_phi(y) - log pi_ref(y)) from outcome labels."""
    beta: float = Field(0.05, gt=0)          # scale of the implicit reward r(y)
    loss: Literal["ce", "dpo"] = "ce"        # ce: every labelled response; dpo: correct over incorrect pairs
    pairs_per_group: int = Field(1, ge=1)    # dpo only
    reference: str | None = None             # the frozen reference; default model.name


class PrimeConfig(Section):
    """PRIME (ALGORITHMS.md §6.3): GRPO whose advantages add dense implicit-PRM token rewards. The PRM
    (a second Learner, `prm:` for its loss) is trained online every step with CE on the rollouts."""
    coef: float = Field(0.0, ge=0)           # weight of the dense rewards; 0 is plain GRPO (no PRM at all)
    update: Literal["after", "before"] = "after"  # score with the PRM before its update on these rollouts, or after
    rloo: Literal["paper", "code"] = "paper"  # the leave-one-out baseline: the paper's formula or the released code's
    dense_norm: Literal["none", "max_abs"] = "none"  # max_abs: dense returns / the batch's largest |return| (the code's)
    model: str | None = None                 # the PRM's initial weights; default model.name
    train: "TrainConfig | None" = None       # the PRM's optimisation; default: the train: section with lr 1e-6


class AlignDistilConfig(Section):
    """AlignDistil (ALGORITHMS.md §5): distil towards a teacher made from a DPO and a reverse-DPO model."""
    dpo_model: str | None = None             # a DPO-trained model (algorithm=dpo); required
    reverse_model: str | None = None         # the same trained on swapped pairs (data.swap_pairs=true); required
    mode: Literal["aligndistil", "theorem1", "theorem1_adaptive"] = "aligndistil"  # teacher z* formula (ALGORITHMS.md §5)
    beta: float = Field(0.1, gt=0)           # the token loss weight is beta / w
    gamma: float = Field(10.0, ge=0)         # w_t = gamma ||p_dpo - p_rev||_1 + 1e-3 (adaptive modes)
    w_max: float | None = Field(None, gt=0)  # cap on the adaptive w_t (not in the paper); null: none
    w: float = Field(0.1, gt=0)              # the fixed w of mode theorem1
    temperature: float = Field(1.0, gt=0)    # T_kd, on the teacher's logits only
    reference: str | None = None             # z_ref of the theorem-1 modes; default model.name
    states: Literal["on_policy", "off_policy"] = "on_policy"  # own samples, or the preferred responses of a file


class RewardModelTrainConfig(Section):
    """Reward-model training (algorithm=reward_model): Bradley-Terry on preference pairs, as TRL's RewardTrainer."""
    center_rewards_coefficient: float | None = Field(None, ge=0)  # TRL's: + c * mean((r_chosen + r_rejected)^2); null: off


class TrainConfig(Section):
    max_steps: int = Field(20, ge=0)         # training steps: one rollout batch and at most one optimizer step each
    lr: float = Field(1e-6, gt=0)            # AdamW learning rate (after warm-up)
    warmup_steps: int = Field(0, ge=0)       # linear learning-rate warm-up over this many steps, then constant
    weight_decay: float = Field(0.0, ge=0)   # AdamW's weight decay
    max_grad_norm: float = Field(1.0, gt=0)  # clip the global gradient norm to this
    adam_eps: float = Field(1e-8, gt=0)      # AdamW's epsilon
    max_bad_steps: int = Field(3, ge=1)      # consecutive steps with a non-finite loss/gradient before stopping
    micro_batch_size: int = Field(8, ge=1)   # sequences per forward/backward
    zero_stage: Literal[0, 2, 3] = 0         # picks configs/deepspeed/zero{N}.json (DeepSpeed ZeRO)
    # How the decoder is back-propagated: plain autograd, HF gradient checkpointing (per layer),
    # or StreamBP (rlpost/streambp.py: exact, sequence-chunked, for long responses).
    backward: Literal["autograd", "checkpointing", "streambp"] = "autograd"
    # backward=autograd: rows that repeat a prompt (a group's samples, a pair's answers) decode it once,
    # and a micro-batch of <= 512 tokens runs as one row without padding (the same arithmetic, other
    # rounding: docs/training.md#shared-prompts)
    share_prompts: bool = True
    streambp_chunk_size: int = Field(512, ge=1)  # StreamBP rows per layer chunk
    # real response positions per vocabulary-head chunk (every mode); a micro-batch of more than one
    # chunk recomputes each chunk's logits in backward, one chunk keeps its log-probs
    logits_chunk_size: int = Field(512, ge=1)
    deepspeed_config: str | None = None      # default: configs/deepspeed/zero{zero_stage}.json

    @property
    def shares_prompts(self) -> bool:
        """Whether the learner's rows share their prompts (share_prompts applies to plain autograd)."""
        return self.share_prompts and self.backward == "autograd"

    def deepspeed_config_path(self) -> Path:
        return Path(self.deepspeed_config or REPO_ROOT / "configs" / "deepspeed" / f"zero{self.zero_stage}.json")


class EvalConfig(Section):
    every: int = Field(0, ge=0)              # 0: only before and after training
    num_prompts: int | None = Field(None, ge=1)  # None: the whole held-out split
    pass_k: int = Field(4, ge=1)             # samples per prompt for pass@k (1 disables sampling)
    max_new_tokens: int | None = Field(None, ge=1)  # default: rollout.max_new_tokens
    at_start: bool = True                    # evaluate before step 1 (not when resuming)
    # accuracy: greedy (and pass@k) accuracy on held-out prompts, scored by the verifier.
    # pairwise: share of held-out preference pairs whose implicit reward beta (log pi - log pi_ref)
    # ranks chosen strictly above rejected (needs rollout.scheduler=dataset and held-out pairs).
    # none: no eval (a PRM trained on labelled completions: scripts/eval_reward_model.py evaluates it).
    kind: Literal["accuracy", "pairwise", "none"] = "accuracy"


class CheckpointConfig(Section):
    every: int = Field(10, ge=0)             # 0: only the final one
    keep_last: int = Field(2, ge=1)          # step checkpoints kept; older ones are deleted


ALGORITHMS = ("grpo", "dpo", "apo", "aligndistil", "implicit_prm", "reward_model")  # rlpost/objectives/__init__.py registers one objective per name


class Config(Section):
    algorithm: Literal[ALGORITHMS] = "grpo"  # the objective: what a step trains on and its loss
    run: RunConfig = RunConfig()             # where a run writes, and its seed
    model: ModelConfig = ModelConfig()       # the policy model
    data: DataConfig = DataConfig()          # training and held-out prompts (or fixed responses)
    rollout: RolloutConfig = RolloutConfig()  # how responses are sampled
    reward: RewardConfig = RewardConfig()    # outcome reward: the math verifier, or reward functions/models
    curriculum: CurriculumConfig = CurriculumConfig()  # which prompts each step samples
    grpo: GRPOConfig = GRPOConfig()          # GRPO loss (algorithm=grpo)
    dpo: DPOConfig = DPOConfig()             # DPO loss (algorithm=dpo)
    apo: APOConfig = APOConfig()             # APO (algorithm=apo)
    aligndistil: AlignDistilConfig = AlignDistilConfig()  # AlignDistil (algorithm=aligndistil)
    prime: PrimeConfig = PrimeConfig()       # PRIME: GRPO plus dense PRM rewards (prime.coef > 0)
    prm: PRMConfig = PRMConfig()             # implicit PRM loss (algorithm=implicit_prm, and PRIME's PRM)
    reward_model: RewardModelTrainConfig = RewardModelTrainConfig()  # reward-model training (algorithm=reward_model)
    train: TrainConfig = TrainConfig()       # optimizer and backward pass of the policy
    eval: EvalConfig = EvalConfig()          # held-out evaluation
    checkpoint: CheckpointConfig = CheckpointConfig()  # checkpoint saving

    def vllm_options(self, longest_prompt: int | None = None) -> dict:
        """make_engine's vLLM settings from the rollout section. `longest_prompt`: the job's longest
        prompt in tokens, where the caller has them (else the limit data.max_prompt_tokens)."""
        r = self.rollout
        longest = max(r.max_new_tokens, self.eval.max_new_tokens or 0)
        prompt = min(longest_prompt, self.data.max_prompt_tokens) if longest_prompt else self.data.max_prompt_tokens
        return {"max_model_len": r.vllm_max_model_len or prompt + longest,
                "gpu_memory_utilization": r.vllm_gpu_memory_utilization, "cpu_kv_cache_gib": r.vllm_cpu_kv_cache_gib}

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.grpo.eps_low >= 1:
            raise ValueError("grpo.eps_low must be < 1 (the ratio is clipped at 1 - eps_low)")
        if self.eval.kind != "none" and (self.rollout.scheduler == "dataset") != (self.eval.kind == "pairwise"):
            raise ValueError("eval.kind=pairwise goes with rollout.scheduler=dataset (held-out pairs) and "
                             "eval.kind=accuracy with generated rollouts (held-out prompts)")
        if self.algorithm == "reward_model" and self.rollout.scheduler != "dataset":
            raise ValueError("algorithm=reward_model trains on preference pairs from a file: set rollout.scheduler=dataset "
                             "and data.source")
        if self.rollout.shared_model is True and (self.rollout.engine != "hf" or self.rollout.placement != "colocated"):
            raise ValueError("rollout.shared_model=true generates with the hf engine from the learner's own module: "
                             f"set rollout.engine=hf (got {self.rollout.engine}) and rollout.placement=colocated "
                             f"(got {self.rollout.placement})")
        if self.rollout.placement == "workers" and self.rollout.scheduler == "dataset":
            raise ValueError("rollout.placement=workers generates rollouts (rollout.scheduler sync or april); "
                             "rollout.scheduler=dataset's fixed responses need no engine")
        if self.reward.user_scorers and self.rollout.scheduler == "dataset":
            raise ValueError("reward.functions score generated rollouts (rollout.scheduler sync or april); "
                             "a file's responses arrive labelled")
        if self.curriculum.sampler == "cures" and self.rollout.group_size < self.curriculum.k_min:
            raise ValueError("rollout.group_size (the mean rollouts per prompt) must be >= curriculum.k_min")
        if self.model.lora is not None and self.model.lora.dropout > 0 and self.train.backward == "streambp":
            raise ValueError("model.lora.dropout must be 0 with train.backward=streambp (StreamBP recomputes each "
                             "layer chunk by chunk and cannot replay the dropout masks)")
        return self



def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "value_error":  # our own validators: their message names the key already
        msg = msg.removeprefix("Value error, ")
        key = "" if msg.split(":")[0].split()[0].count(".") or key == "config" else key
    elif "input" in first and not isinstance(first["input"], dict):
        msg += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    return (f"{key}: {msg}" if key else msg) + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:  # a section written as null (model.lora: null) that an override fills in
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a directory, not a config file (pass a YAML file, e.g. configs/grpo_math.yaml)")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    try:
        config = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"config error: {_format_error(e)}") from None
    for f in config.reward.functions or []:  # a relative file path is relative to the config's folder
        where, _, name = f.fn.rpartition(":")
        if where.endswith(".py") and not Path(where).expanduser().is_absolute():
            base = path.parent if path is not None else Path.cwd()
            f.fn = f"{(base / where).resolve()}:{name}"
    return config


def dump_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))


PrimeConfig.model_rebuild()
