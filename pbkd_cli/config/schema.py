"""The structured schema every composed config is checked against.

Each dataclass mirrors the code that consumes it: `ModelConfig` is what `models.load_*` takes,
`TrainerConfig` what `engine.build_engine` and the training loops take, and each stage section
(`sft`, `eval`, ...) is what that stage's `run` reads. Defaults for real runs live in `conf/`;
the values here are only the fallbacks the YAML files refine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    auto = "auto"  # bfloat16 on a GPU that supports it, float32 elsewhere (a CPU is slow in bf16)


@dataclass
class TinyLlamaConfig:
    """Architecture of a Llama built from scratch (no hub): the CPU demo's models."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 256


@dataclass
class ApiConfig:
    """An OpenAI-compatible chat-completions endpoint; the key comes from the `api_key_env` variable.

    No `base_url` means no endpoint (for a model: load its weights locally).
    """

    base_url: Optional[str] = None
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 3
    concurrency: int = 4
    # Responses stored by request (endpoint, model, messages, sampling settings; never the key), so a
    # rerun asks nothing twice; null: no cache.
    cache_dir: Optional[str] = "~/.cache/pbkd/api"


@dataclass
class LoraConfig:
    """Low-rank adapters (PEFT's LoRA) in place of full fine-tuning of a model a stage trains."""

    # The adapters' rank; 0 trains every weight.
    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    # Module names (or suffixes) that get adapters; null: every linear layer but the output head.
    target_modules: Optional[List[str]] = None


@dataclass
class ModelConfig:
    """One model: loaded from `name_or_path` (hub id or local dir), else built from `tiny`."""

    name_or_path: Optional[str] = None
    tiny: Optional[TinyLlamaConfig] = None
    revision: Optional[str] = None
    gguf_file: Optional[str] = None
    dtype: Dtype = Dtype.float32
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = "sdpa"
    # A black-box teacher served behind an OpenAI-compatible API instead of loaded weights
    # (teacher only: the student and the reward model are always local).
    api: ApiConfig = field(default_factory=ApiConfig)
    # The student and the RM (or Q) when a stage trains them; saved as the merged model plus `adapter/`.
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ModelsConfig:
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    # Backbone of the scalar reward model (value head added by `models.load_reward_model`).
    rm: ModelConfig = field(default_factory=ModelConfig)
    # Proxy-KD's white-box proxy: a model of the teacher's family that we hold, aligned to the teacher
    # (`pipeline.baselines`), whose token probabilities then teach the student.
    proxy: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class TokenizerConfig:
    """The BPE tokenizer built locally for models that have no `name_or_path`."""

    vocab_size: int = 512
    corpus_size: int = 2000


class TaskName(str, Enum):
    arithmetic = "arithmetic"
    gsm8k = "gsm8k"
    # Prompt-completion data in TRL's formats (standard or conversational), local JSONL or hub.
    custom = "custom"


@dataclass
class ArithmeticConfig:
    min_steps: int = 2
    max_steps: int = 3
    max_operand: int = 20
    operations: List[str] = field(default_factory=lambda: ["+", "-"])
    max_multiplier: int = 5
    allow_negative: bool = False
    seed: int = 0
    train_size: int = 4000
    test_size: int = 200


class OverlongPrompts(str, Enum):
    truncate = "truncate"
    drop = "drop"


@dataclass
class DataConfig:
    task: TaskName = TaskName.arithmetic
    # gsm8k, custom: a local JSONL per split (gsm8k: the hub's question/answer rows; custom: TRL's
    # prompt/completion or messages rows) overrides the hub data set (set with the arithmetic task,
    # which would ignore it: a one-line error).
    train_path: Optional[str] = None
    test_path: Optional[str] = None
    hub_id: Optional[str] = "openai/gsm8k"
    hub_config: Optional[str] = "main"
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    prompt_template: str = "Question: {question}\nAnswer:"
    # Wrap the prompt in the tokenizer's chat template (instruct models).
    use_chat_template: bool = False
    max_prompt_tokens: int = 128
    max_response_tokens: int = 64
    # Prompts longer than max_prompt_tokens: keep their last tokens (truncate) or leave them out (drop);
    # either way the count is in the run's summary.
    overlong_prompts: OverlongPrompts = OverlongPrompts.truncate


class GenerationBackend(str, Enum):
    auto = "auto"  # vLLM when it is installed and a GPU is present, else Hugging Face generate
    hf = "hf"
    vllm = "vllm"


@dataclass
class GenerationConfig:
    """Sampling settings shared by every stage that generates."""

    # Who samples fixed models (collection, evaluation); the min-max game always uses `hf`.
    backend: GenerationBackend = GenerationBackend.auto
    top_p: float = 1.0
    batch_size: int = 128


class LrSchedule(str, Enum):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


@dataclass
class TrainerConfig:
    """Optimisation loop of the stage being run."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    lr_schedule: LrSchedule = LrSchedule.cosine
    warmup_ratio: float = 0.05
    max_steps: int = 500
    micro_batch_size: int = 32
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    # If set, checked against micro_batch_size * grad_accum * world size (the launcher's ranks).
    global_batch_size: Optional[int] = None
    # Recompute activations in the backward pass: less memory, about a third more compute.
    gradient_checkpointing: bool = False
    log_every: int = 10
    # Save model, optimiser, scheduler, RNG and data position every N steps (minmax: iterations);
    # 0 saves only when SIGTERM/SIGUSR1 asks the run to stop. The newest `keep_checkpoints` stay.
    checkpoint_every: int = 100
    keep_checkpoints: int = 2


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class LoggerConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "pbkd"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    progress_bars: bool = True


@dataclass
class HubConfig:
    """Push the model a stage trains (`<run dir>/model`: the merged weights, plus `adapter/` with LoRA)
    to the Hugging Face hub when the stage has finished."""

    # null: no push. The repository is created (private by default) before the stage starts, so a bad
    # token or name fails before any training, not after.
    repo_id: Optional[str] = None
    private: bool = True
    # The branch to push to (null: the default branch).
    revision: Optional[str] = None
    # The environment variable holding the token: read there only, never written to a config or log.
    token_env: str = "HF_TOKEN"


class ModelRole(str, Enum):
    teacher = "teacher"
    student = "student"
    proxy = "proxy"


class ResponseSource(str, Enum):
    gold = "gold"
    teacher = "teacher"


class Divergence(str, Enum):
    fkl = "fkl"  # forward KL(p_T || q_S)
    rkl = "rkl"  # reverse KL(q_S || p_T)
    jsd = "jsd"  # generalised JSD(beta) of GKD
    tvd = "tvd"  # total variation
    skl = "skl"  # skew KL of DistiLLM
    srkl = "srkl"  # skew reverse KL of DistiLLM


@dataclass
class KDConfig:
    """White-box KD: match the teacher's next-token distribution, not just its sampled tokens.

    loss = divergence(teacher || student) + ce_weight * CE(response tokens). The responses come
    from `sft.source` (gold data or teacher samples), except that a fraction `on_policy_ratio`
    (GKD's lambda) of the batches is sampled from the current student instead. The teacher must
    share the student's tokenizer.
    """

    # null: plain SFT (cross-entropy only).
    loss: Optional[Divergence] = None
    ce_weight: float = 0.0
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    # Positions per chunk of full-vocabulary intermediates (a 150k vocabulary needs it); null: all at once.
    chunk_size: Optional[int] = 1024
    on_policy_ratio: float = 0.0
    on_policy_temperature: float = 1.0


@dataclass
class SFTConfig:
    """Supervised fine-tuning of `model.<model>`, loss on response tokens only.

    `source=gold` trains on the data set's solutions (the demo's teacher is made this way:
    `sft.model=teacher`); `source=teacher` samples the responses from `model.teacher` first and
    trains the student on them: vanilla black-box KD.
    """

    model: ModelRole = ModelRole.student
    source: ResponseSource = ResponseSource.gold
    teacher_samples_per_prompt: int = 1
    teacher_temperature: float = 0.0
    # source=teacher: JSONL of the teacher's answers ({"id", "response"}, e.g. an earlier run's
    # teacher_responses.jsonl), `teacher_samples_per_prompt` per prompt, read instead of sampled.
    teacher_answers_path: Optional[str] = None
    kd: KDConfig = field(default_factory=KDConfig)


class BenchmarkKind(str, Enum):
    task = "task"  # the run's own `data` task (its test split), exact match of the final number
    gsm8k = "gsm8k"  # GSM8K-format word problems, exact match of the final number
    multiple_choice = "multiple_choice"  # ARC / MMLU style, the choice of highest log-likelihood
    instruction = "instruction"  # Dolly / Self-Instruct / Vicuna style, ROUGE-L of a greedy answer


@dataclass
class BenchmarkConfig:
    """One benchmark of `eval`, from a local JSONL file (`path`) or the hub (`hub_id`, `hub_config`, `split`)."""

    kind: BenchmarkKind = BenchmarkKind.task
    path: Optional[str] = None
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    split: str = "test"
    limit: Optional[int] = None
    # multiple_choice: {question}, each choice scored as the continuation " <choice>";
    # instruction: {instruction} (the context, if any, appended to it).
    prompt_template: str = "Question: {question}\nAnswer:"


@dataclass
class EvalConfig:
    model: ModelRole = ModelRole.student
    # Several checkpoints in one run and one comparison table: label -> name_or_path of `model.<model>`
    # (`+eval.models.kd=outputs/.../model`; null: built from `tiny`); empty: the configured model alone.
    models: Dict[str, Optional[str]] = field(default_factory=dict)
    # name -> benchmark (`conf/benchmarks/`); empty: the run's own task.
    benchmarks: Dict[str, BenchmarkConfig] = field(default_factory=dict)
    split: str = "test"
    limit: Optional[int] = None
    # n > 1 adds sampled accuracy (mean over samples) and majority vote over the n samples.
    num_samples: int = 1
    temperature: float = 0.7


class Labeler(str, Enum):
    teacher_preferred = "teacher_preferred"
    correctness = "correctness"
    llm_judge = "llm_judge"


class PrefsFormat(str, Enum):
    jsonl = "jsonl"
    parquet = "parquet"


@dataclass
class CollectPrefsConfig:
    """Sample k responses per prompt from teacher and student, rank them into pairs."""

    labeler: Labeler = Labeler.teacher_preferred
    # correctness labeler: also require every written `a op b = c` step to hold.
    check_equations: bool = True
    samples_per_model: int = 2
    temperature: float = 1.0
    max_pairs_per_prompt: int = 2
    # The prompts are the train split's [prompt_offset, prompt_offset + num_prompts).
    prompt_offset: int = 0
    num_prompts: Optional[int] = 1000
    # Prompts per committed chunk: a killed run redoes at most one chunk.
    chunk_prompts: int = 64
    format: PrefsFormat = PrefsFormat.jsonl
    iteration: int = 0
    # The llm_judge labeler's endpoint (`pbkd serve` on this machine by default).
    judge: ApiConfig = field(default_factory=lambda: ApiConfig(base_url="http://127.0.0.1:8000/v1", model="judge"))


class RewardPooling(str, Enum):
    last = "last"  # the value head at the last token: what transformers, TRL and vLLM read
    # The mean of the value head over the response tokens: pbkd's `score` only. Any other tool reads the
    # saved sequence classifier at the last token, so outside pbkd its rewards (and rankings) differ.
    mean = "mean"
    likelihood = "likelihood"  # the mean log-probability of the response tokens under the RM's own LM head


@dataclass
class TrainRMConfig:
    """Bradley-Terry MLE of the reward model `model.rm` on a preference file."""

    prefs_path: Optional[str] = None
    # How a fresh value head turns per-token outputs into a reward (kept in the saved RM's config). `last`
    # by default: the saved RM then scores the same in pbkd as in every tool that loads it.
    pooling: RewardPooling = RewardPooling.last
    # `likelihood` pooling only: the reward is this times the mean response log-probability (SimPO's
    # beta). A mean log-probability moves by a few hundredths between a right and a wrong answer that
    # differ in one number, so at scale 1 every pair starts near a BT loss of log 2 and the fit inflates
    # the margins of the pairs its LM head already ranks right, moving every token's probability, which
    # costs it the ranking of the few it gets wrong (demo: 0.987 of its pairs ranked right at the start,
    # 0.961 after the fit). Kept in the saved RM's config.
    likelihood_scale: float = 1.0
    # Pairs held out (seeded) to report pairwise accuracy; the paper's bar is > 90% before min-max.
    heldout_fraction: float = 0.1


class PreferenceLoss(str, Enum):
    sigmoid = "sigmoid"  # DPO (with label_smoothing: conservative DPO)
    ipo = "ipo"  # IPO: the margin is pulled to 1/(2 beta), not pushed on


@dataclass
class DPOConfig:
    """Preference optimisation of `model` on a preference file, against itself as it starts (`pbkd dpo`)."""

    prefs_path: Optional[str] = None
    model: ModelRole = ModelRole.student
    loss: PreferenceLoss = PreferenceLoss.sigmoid
    beta: float = 0.1
    label_smoothing: float = 0.0
    # Weight of the chosen answers' per-token NLL added to the loss (RPO; TRL's rpo_alpha). The margin
    # alone also rises when both log-probs fall, which on small models unlearns the chosen answers too.
    sft_weight: float = 0.0
    # Pairs held out (seeded) to report how often the implicit reward ranks them right.
    heldout_fraction: float = 0.1


class Baseline(str, Enum):
    group_mean = "group_mean"  # mean reward of the k samples of the same prompt (GRPO-style)
    leave_one_out = "leave_one_out"  # mean of the other k - 1 samples (RLOO)


class AdvantageScale(str, Enum):
    none = "none"  # r - b as it is: the RM's scale sets the step size against the KL term
    group = "group"  # divided by the std of the prompt's group (GRPO)
    batch = "batch"  # divided by the std of all the iteration's advantages (REINFORCE++-style)


class GameReward(str, Enum):
    rm = "rm"  # the min-max game: the RM, kept in the confidence set, is the adversary (PbKD)
    # A control without any RM: 1 for a response whose final answer is right and whose written steps
    # hold, 0 otherwise (verifiable-reward RL). If this cannot raise accuracy, no learnt reward can.
    correctness = "correctness"


@dataclass
class WhiteBoxConfig:
    """MM PbKD (`variant=white_box`): the RM is a Q-function Q(s, .) over the vocabulary."""

    # Discount of the implied reward r_Q(s, a) = Q(s, a) - gamma * E_{a'~pi_E} Q(s', a').
    gamma: float = 1.0
    # Q step: the gap's student term as its expectation under pi_old instead of the sampled token's Q.
    expected_student_term: bool = True
    # Student step = moment_matching_coef * on-policy moment matching + pg_coef * clipped PG.
    moment_matching_coef: float = 1.0
    pg_coef: float = 1.0


@dataclass
class MinMaxConfig:
    """The offline PbKD game: RM ascent on the Lagrangian, student clipped policy gradient.

    With `variant=white_box` the RM is the Q-function of MM PbKD and `reward_l2` bounds the
    per-token moment terms E_{pi_E} Q(s, .) - Q(s, a) instead of the sequence rewards.
    """

    prefs_path: Optional[str] = None
    iterations: int = 100
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 4
    # Prompts sampled per prompt trained on: each iteration samples prompts_per_iteration x oversample
    # prompts and the student step keeps the prompts_per_iteration whose rewards spread most.
    oversample: int = 1
    # With oversample > 1 and teacher_in_group: the pool's prompts whose teacher answer the reward scores in
    # the lowest distrusted_fraction are chosen last (where a learnt reward doubts even the teacher, its
    # ranking of the student's samples is mostly noise; the verifiable reward gives 0 there).
    distrusted_fraction: float = 0.0
    temperature: float = 1.0
    prompt_offset: int = 0
    num_prompts: Optional[int] = None
    # Prompt pools of the seed's schedule that earlier games already played: this game plays the next
    # `iterations`. Online PbKD sets it, so that round t visits new prompts rather than round 1's again.
    schedule_offset: int = 0
    # The game as one of `schedule_rounds` equal games played one after another (online PbKD's rounds):
    # the student's lr schedule spans them all, each round but the last saves its student's engine state
    # (weights, AdamW moments, schedule position) in `student_state/`, and `continue_from`, the previous
    # round's run directory, starts this round from it. A fresh optimiser and schedule per round warm up
    # again to the peak lr, where every game falls: online PbKD with sums up to 20 (seed 0) read 0.555
    # that way, 0.577 with one schedule (offline 0.577; README).
    schedule_rounds: int = 1
    continue_from: Optional[str] = None
    teacher_samples_per_prompt: int = 1
    # The teacher's answers the RM compares the student's with: 0 is greedy (its best answer, as vanilla
    # KD's data), which allows one sample per prompt.
    teacher_temperature: float = 0.0
    # The teacher's answers as JSONL rows {"id", "response"} (sft's teacher_responses.jsonl, whose greedy
    # answers are these), teacher_samples_per_prompt per prompt; null: the teacher answers the game's
    # prompts itself. The pipeline passes vanilla KD's, so that no game samples the teacher again.
    teacher_answers_path: Optional[str] = None
    # Student step: the teacher's answers join each prompt's group, scored by the same reward, as
    # off-policy samples: where every sample of the student is wrong and the teacher's answer is right
    # the group's only signal is to imitate the teacher (which a ranking reward alone cannot give: it
    # pushes the least bad wrong sample up), and where the student already answers as the teacher does
    # the group is silent. The game's budget counts them.
    teacher_in_group: bool = False
    # RM step: ascend mean r(teacher) - mean r(student) - beta * L_BT - reward_l2 * mean r^2.
    beta: float = 1.0
    reward_l2: float = 0.01
    rm_lr: float = 1.0e-4
    rm_steps: int = 1
    rm_pref_batch: int = 32
    # Student step: clipped policy gradient on group-baseline advantages, KL to the initial policy.
    reward: GameReward = GameReward.rm
    clip_eps: float = 0.2
    ppo_epochs: int = 2
    # Rollouts behind each optimiser step (a PPO minibatch); null: all of the iteration's rollouts.
    rollouts_per_update: Optional[int] = None
    baseline: Baseline = Baseline.group_mean
    advantage_scale: AdvantageScale = AdvantageScale.batch
    # Weight on negative advantages: 1 is the plain policy gradient, 0 keeps only the samples that beat
    # their group (RFT/ReST-style filtered update).
    negative_weight: float = 1.0
    kl_coef: float = 0.01
    # Greedy accuracy on the first `eval_prompts` test problems every `eval_every` iterations (0: never),
    # logged as minmax/heldout_accuracy: the sampled accuracy on training prompts is too noisy to steer by.
    eval_every: int = 0
    eval_prompts: int = 200
    white_box: WhiteBoxConfig = field(default_factory=WhiteBoxConfig)

    # The game's batch arithmetic, from these settings alone (the game's engines are built from it).
    def group_size(self) -> int:
        """Responses per prompt in the student step: its own samples, and the teacher's answers when
        they join the group."""
        return self.samples_per_prompt + (self.teacher_samples_per_prompt if self.teacher_in_group else 0)

    def rollouts(self) -> int:
        """Rollouts of one iteration's student step."""
        return self.prompts_per_iteration * self.group_size()

    def updates_per_epoch(self) -> int:
        """Optimiser steps of the student per pass over an iteration's rollouts."""
        return self.rollouts() // (self.rollouts_per_update or self.rollouts())

    def student_updates(self) -> int:
        """Optimiser steps of the student over the game."""
        return self.iterations * self.ppo_epochs * self.updates_per_epoch()

    def student_train_sequences(self) -> int:
        """The game's budget for a compute-matched baseline: sequences the student is trained on."""
        return self.iterations * self.rollouts() * self.ppo_epochs

    def student_samples(self) -> int:
        """Sequences the student samples over the game (`oversample` times those it trains on per epoch)."""
        return self.iterations * self.prompts_per_iteration * self.oversample * self.samples_per_prompt


@dataclass
class OnlineConfig:
    """T rounds of collect (current student) -> merge into D_pref -> refit RM -> min-max."""

    iterations: int = 3
    prompts_per_iteration: int = 256
    # D_pref^0, e.g. the offline pairs; none starts online PbKD from an empty preference set.
    initial_prefs_path: Optional[str] = None


@dataclass
class PipelineConfig:
    """Which steps `pbkd pipeline` runs; each step is a stage run in its own subdirectory."""

    # Demo only: fit the tiny teacher on gold solutions first. Off for a real (pretrained) teacher.
    train_teacher: bool = True
    # Initialise the reward model's backbone from this pipeline's teacher or SFT student (a value
    # head on a model that already solves the task); null keeps `model.rm` as configured.
    rm_init: Optional[ModelRole] = None
    # The control rows: RL with the verifiable reward (what a perfect RM could give) and GAD (the game
    # without the preference anchor). Two more games; `make demo` leaves them out to stay short.
    controls: bool = True
    # The paper's other black-box baselines: DPKD (DPO of the vanilla-KD student on its answers vs the
    # teacher's) and Proxy-KD (a white-box proxy aligned to the teacher, distilled into the student).
    baselines: bool = False
    # Derive the student from the pretrained `model.student` by keeping only these decoder layers (e.g.
    # every other layer of the teacher's checkpoint, DistilBERT's initialisation), saved as step
    # `student_init` and used as the base student; empty: `model.student` as configured.
    student_layers: List[int] = field(default_factory=list)
    # Sample the vanilla-KD student this many times a test problem at the games' temperature and report
    # its pass@k and headroom@k (greedy wrong, a sample right): how much the reward-guided rows could
    # add by training it towards its own right answers. 0 (or 1): greedy only.
    headroom_samples: int = 0


class Variant(str, Enum):
    # The teacher is only seen through its text: the RM scores whole responses.
    black_box = "black_box"
    # The teacher's token probabilities are available: the RM is a Q-function (MM PbKD), and the
    # pipeline adds the white-box KD baselines.
    white_box = "white_box"


@dataclass
class PbkdConfig:
    stage: str = MISSING
    seed: int = 0
    # A run directory holding checkpoints continues from the newest; false deletes them and starts over.
    resume: bool = True
    variant: Variant = Variant.black_box
    model: ModelsConfig = field(default_factory=ModelsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # Raw DeepSpeed config (conf/deepspeed/*.yaml); batch sizes and clipping come from `trainer`.
    deepspeed: Dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    collect_prefs: CollectPrefsConfig = field(default_factory=CollectPrefsConfig)
    train_rm: TrainRMConfig = field(default_factory=TrainRMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    minmax: MinMaxConfig = field(default_factory=MinMaxConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # Per-stage Hydra overrides an experiment applies before the user's own (see conf/exp/demo.yaml).
    stage_overrides: Dict[str, List[str]] = field(default_factory=dict)


# Ranges a value must lie in, checked on every composed config (`config.compose.to_typed`), so a bad
# value, or a bad point of a sweep, is one line before any job starts. None (an unset optional) passes.
# key -> (low, high, low inclusive, high inclusive); None: unbounded on that side.
RANGES: Dict[str, tuple] = {
    **{key: (1, None, True, False) for key in (
        "trainer.max_steps", "trainer.micro_batch_size", "trainer.grad_accum", "trainer.global_batch_size",
        "trainer.log_every", "trainer.keep_checkpoints", "data.max_prompt_tokens", "data.max_response_tokens",
        "data.arithmetic.train_size", "data.arithmetic.test_size", "generation.batch_size",
        "sft.teacher_samples_per_prompt", "sft.kd.chunk_size", "eval.num_samples",
        "collect_prefs.samples_per_model", "collect_prefs.max_pairs_per_prompt", "collect_prefs.chunk_prompts",
        "collect_prefs.num_prompts", "minmax.iterations", "minmax.prompts_per_iteration",
        "minmax.samples_per_prompt", "minmax.oversample", "minmax.teacher_samples_per_prompt", "minmax.num_prompts",
        "minmax.rm_steps", "minmax.rm_pref_batch", "minmax.ppo_epochs", "minmax.rollouts_per_update",
        "minmax.eval_prompts", "minmax.schedule_rounds", "online.iterations", "online.prompts_per_iteration")},
    **{f"model.{role}.lora.{key}": (0, None, True, False) for role in ("student", "rm") for key in ("r", "alpha")},
    **{f"model.{role}.lora.dropout": (0, 1, True, False) for role in ("student", "rm")},
    **{key: (0, None, True, False) for key in (
        "trainer.lr", "trainer.weight_decay", "trainer.max_grad_norm", "trainer.checkpoint_every",
        "data.train_limit", "data.test_limit", "sft.teacher_temperature",
        "sft.kd.ce_weight", "eval.temperature", "collect_prefs.temperature", "collect_prefs.prompt_offset",
        "minmax.prompt_offset", "minmax.schedule_offset", "minmax.teacher_temperature", "minmax.beta",
        "minmax.reward_l2", "minmax.rm_lr", "minmax.negative_weight", "minmax.kl_coef", "minmax.eval_every",
        "dpo.sft_weight", "pipeline.headroom_samples")},
    **{key: (0, None, False, False) for key in (
        "sft.kd.temperature", "sft.kd.on_policy_temperature", "minmax.temperature", "minmax.clip_eps",
        "dpo.beta", "train_rm.likelihood_scale")},
    **{key: (0, 1, True, True) for key in ("sft.kd.jsd_beta", "sft.kd.skew_alpha", "sft.kd.on_policy_ratio")},
    "trainer.warmup_ratio": (0, 1, True, False),
    "train_rm.heldout_fraction": (0, 1, True, False),
    "dpo.heldout_fraction": (0, 1, True, False),
    "dpo.label_smoothing": (0, 0.5, True, False),
    "minmax.distrusted_fraction": (0, 1, True, False),
    "generation.top_p": (0, 1, False, True),
}


# The steps of `pipeline` and `online` (stages/pipeline.py, stages/online.py) whose own
# `stage_overrides[<step>]` apply on top of their stage's; an evaluation step is `eval/<method>`.
STEP_NAMES = ("teacher", "vanilla_kd", "vanilla_kd_budget", "kd_fkl", "kd_rkl", "rl_correctness", "offline_prefs",
              "train_q", "gad", "pbkd_offline", "pbkd_online", "dpkd_prefs", "dpkd", "proxy_sft",
              "proxy_prefs", "proxy_dpo", "proxy_kd",
              "online/collect_prefs", "online/train_rm", "online/train_q", "online/minmax")
STAGE_NAMES = ("sft", "collect_prefs", "train_rm", "dpo", "minmax", "online", "eval", "pipeline")


def contradiction(cfg: "PbkdConfig") -> str | None:
    """The first `key=value: why` of `cfg` that another setting makes meaningless, or None: a value the
    run would silently ignore is a mistake to hear about before any job starts."""
    for key in cfg.stage_overrides:
        if key not in STAGE_NAMES and key not in STEP_NAMES and not key.startswith("eval/"):
            return (f"stage_overrides.{key}: no stage or pipeline step has this name (stages: "
                    f"{', '.join(STAGE_NAMES)}; steps: {', '.join(STEP_NAMES)})")
    if cfg.hub.repo_id is not None and cfg.stage in ("pipeline", "online", "collect_prefs", "eval"):
        return (f"hub.repo_id={cfg.hub.repo_id}: stage {cfg.stage} trains no one model to push (a pipeline's "
                f"steps would all push to it); push the run of the model you want, or `huggingface-cli upload` "
                f"a step's model/ folder")
    zero = cfg.deepspeed.get("zero_optimization", {}).get("stage", 0)
    for role in ("student", "rm", "proxy"):
        lora = getattr(cfg.model, role).lora
        if lora.r and zero == 3:
            return (f"model.{role}.lora.r={lora.r}: LoRA runs on ZeRO stages 0-2 (the frozen base is replicated, "
                    f"the adapters are small); deepspeed.zero_optimization.stage=3 partitions it (use deepspeed=zero2)")
    if cfg.model.teacher.lora.r:
        return f"model.teacher.lora.r={cfg.model.teacher.lora.r}: the teacher is never trained; adapters are for the student and the RM"
    data = cfg.data
    for key in ("train_path", "test_path"):
        value = getattr(data, key)
        if value is not None and data.task == TaskName.arithmetic:
            return (f"data.{key}={value}: data.task=arithmetic generates its examples and reads no file "
                    f"(set data=gsm8k, or data.task=custom for prompt/completion rows)")
    return None


def unplayable_game(cfg: "PbkdConfig") -> str | None:
    """The first `key=value: why` of a `minmax` run's settings that cannot make a game, or None."""
    if cfg.stage != "minmax":
        return None
    c, micro = cfg.minmax, cfg.trainer.micro_batch_size
    per_update = c.rollouts_per_update or c.rollouts()
    if c.rollouts() % per_update or per_update % micro:
        return (f"minmax.rollouts_per_update={per_update}: must divide the iteration's rollouts "
                f"(prompts_per_iteration x {c.group_size()} responses per group = {c.rollouts()}) and be a "
                f"multiple of trainer.micro_batch_size={micro}")
    if c.distrusted_fraction > 0 and not (c.teacher_in_group and c.oversample > 1):
        return (f"minmax.distrusted_fraction={c.distrusted_fraction}: it orders the oversampled pool by the "
                "teacher's answers' reward; set minmax.teacher_in_group=true and minmax.oversample > 1")
    if c.continue_from is not None and c.schedule_rounds == 1:
        return (f"minmax.continue_from={c.continue_from}: a game that goes on from another is a later round of "
                "one lr schedule; set minmax.schedule_rounds to the number of rounds it spans")
    if c.teacher_temperature == 0 and c.teacher_samples_per_prompt != 1:
        return (f"minmax.teacher_samples_per_prompt={c.teacher_samples_per_prompt}: greedy teacher "
                "answers (minmax.teacher_temperature=0) give one per prompt")
    if cfg.trainer.grad_accum != 1 or cfg.trainer.global_batch_size is not None:
        key, value = (("trainer.grad_accum", cfg.trainer.grad_accum) if cfg.trainer.grad_accum != 1
                      else ("trainer.global_batch_size", cfg.trainer.global_batch_size))
        return (f"{key}={value}: the game's student batch is minmax.rollouts_per_update "
                f"({per_update} rollouts = {per_update // micro} micro-batches of trainer.micro_batch_size={micro})")
    return None


def unbuildable_model(cfg: "PbkdConfig") -> str | None:
    """The first `key=value: why` of a tiny architecture (a model built from scratch) that transformers
    could not build, or None: found at config time, not as a traceback after the data loads."""
    for role in ("teacher", "student", "rm"):
        model, key = getattr(cfg.model, role), f"model.{role}.tiny"
        if model.tiny is None or model.name_or_path is not None:
            continue
        tiny = model.tiny
        for name, value in vars(tiny).items():
            if value < 1:
                return f"{key}.{name}={value}: must be >= 1"
        if tiny.hidden_size % tiny.num_attention_heads:
            return (f"{key}.hidden_size={tiny.hidden_size}: must be a multiple of "
                    f"{key}.num_attention_heads={tiny.num_attention_heads}")
        if tiny.num_attention_heads % tiny.num_key_value_heads:
            return (f"{key}.num_attention_heads={tiny.num_attention_heads}: must be a multiple of "
                    f"{key}.num_key_value_heads={tiny.num_key_value_heads}")
    return None


def out_of_range(cfg: "PbkdConfig") -> str | None:
    """The first `key=value: must be ...` of `cfg` outside `RANGES`, or None."""
    for key, (low, high, low_in, high_in) in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None:
            continue
        below = low is not None and (value < low if low_in else value <= low)
        above = high is not None and (value > high if high_in else value >= high)
        if below or above:
            bounds = [f"{'>=' if low_in else '>'} {low}" if low is not None else "",
                      f"{'<=' if high_in else '<'} {high}" if high is not None else ""]
            return f"{key}={value}: must be {' and '.join(b for b in bounds if b)}"
    return None
