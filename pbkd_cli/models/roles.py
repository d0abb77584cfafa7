"""The models of a run by role (`model.teacher`, `model.student`, `model.rm`): each loaded with its
tokenizer, as the stages use it."""

from __future__ import annotations

import logging
from pathlib import Path

from pbkd_cli.config.schema import PbkdConfig
from pbkd_cli.data.tasks import tokenizer_corpus
from pbkd_cli.engine import build_frozen_engine, save_model
from pbkd_cli.engine.distributed import barrier
from pbkd_cli.io import PbkdError
from pbkd_cli.models.factory import keep_decoder_layers, load_causal_lm, load_tokenizer, parameter_count

log = logging.getLogger("pbkd")


def load_role_tokenizer(cfg: PbkdConfig, role: str):
    """The tokenizer of `model.<role>`; from-scratch models get the one built from the task's corpus."""
    return load_tokenizer(getattr(cfg.model, role), f"model.{role}", cfg.tokenizer,
                          corpus=lambda: tokenizer_corpus(cfg.data, cfg.tokenizer.corpus_size))


def load_lm(cfg: PbkdConfig, role: str):
    """(tokenizer, causal LM) for `model.<role>`."""
    model_cfg = getattr(cfg.model, role)
    key = f"model.{role}"
    tokenizer = load_role_tokenizer(cfg, role)
    model = load_causal_lm(model_cfg, tokenizer, key)
    log.info("%s: %s (%.2fM parameters)", key, model_cfg.name_or_path or "tiny Llama from scratch",
             parameter_count(model) / 1e6)
    return tokenizer, model


def load_rm(cfg: PbkdConfig):
    """(tokenizer, reward model) for `model.rm`: a trained RM, or a value head on a backbone."""
    from pbkd_cli.models.reward import load_reward_model

    tokenizer = load_role_tokenizer(cfg, "rm")
    return tokenizer, load_reward_model(cfg.model.rm, tokenizer, cfg.train_rm.pooling,
                                        likelihood_scale=cfg.train_rm.likelihood_scale)


def require_same_vocab(tokenizer, other, key: str) -> None:
    """White-box objectives compare distributions token by token, so the vocabularies must agree."""
    if tokenizer.get_vocab() != other.get_vocab():
        raise PbkdError(f"{key}: its tokenizer differs from the student's; white-box distillation compares "
                        f"next-token distributions and needs one shared vocabulary")


def load_teacher(cfg: PbkdConfig, student_tokenizer):
    """The teacher as a frozen model whose token probabilities white-box stages read (its own ZeRO-3
    engine when the DeepSpeed config is stage 3)."""
    if cfg.model.teacher.api.base_url is not None:
        raise PbkdError("model.teacher.api.base_url: white-box distillation needs the teacher's weights, "
                        "not an API (unset it or use variant=black_box)")
    tokenizer, teacher = load_lm(cfg, "teacher")
    require_same_vocab(student_tokenizer, tokenizer, "model.teacher")
    return build_frozen_engine(teacher, cfg.deepspeed)


def load_q_model(cfg: PbkdConfig, student_tokenizer):
    """(tokenizer, Q) for `model.rm` in MM PbKD: Q(s, .) is the logits of a causal LM (a trained Q, the
    teacher's or the student's weights as a start, or a tiny Llama from scratch)."""
    tokenizer = load_role_tokenizer(cfg, "rm")
    require_same_vocab(student_tokenizer, tokenizer, "model.rm")
    return tokenizer, load_causal_lm(cfg.model.rm, tokenizer, "model.rm")


def derive_student(cfg: PbkdConfig, path: Path) -> Path:
    """Save at `path` the student `model.student` with only the decoder layers `pipeline.student_layers`
    (once: a pipeline that resumes finds it there)."""
    if not (path / "config.json").is_file():
        tokenizer, model = load_lm(cfg, "student")
        before = parameter_count(model)
        keep_decoder_layers(model, list(cfg.pipeline.student_layers), "pipeline.student_layers")
        log.info("student_init: layers %s of %s kept (%.2fM of %.2fM parameters)", list(cfg.pipeline.student_layers),
                 cfg.model.student.name_or_path or "model.student", parameter_count(model) / 1e6, before / 1e6)
        save_model(model, tokenizer, path)  # rank 0 writes
    barrier()
    return path
