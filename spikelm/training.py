"""`spikelm train`: train a spikelm model from scratch (a preset) or fine-tune a saved one, with transformers.Trainer.

    spikelm train --output runs/small                       # the bundled corpus, the `small` preset
    spikelm train --corpus my.jsonl --output runs/mine --preset tiny --max-steps 200
    spikelm train --model runs/small --corpus other.txt --output runs/tuned   # fine-tuning
    accelerate launch --config_file train/accelerate/ddp.yaml -m spikelm.cli train ...   # several processes

Trainer (accelerate underneath) does the schedule, gradient accumulation, clipping, mixed precision (bf16 on
GPUs that have it, none on CPU), DDP/FSDP, the progress bar and safetensors checkpoints. What spikelm adds:
- a tokenizer trained on the corpus when none is given (spikelm.tokenizer),
- held-out perplexity and bits per byte at every evaluation, and the energy per token and firing rate of the
  model on a held-out block (EnergyCallback),
- checkpoints that appear atomically: written aside, then renamed into place, so that a run killed while
  saving never leaves a half-written checkpoint-N for --resume to pick up.
"""

import json
import math
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from .configuration_spikelm import SpikeLMConfig
from .data import bits_per_byte, iter_texts, load_corpus, prepare_blocks, quiet_datasets
from .energy import count_inference
from .errors import SpikeLMError
from .presets import PRESETS, preset
from .tokenizer import has_tokenizer, load_tokenizer, train_tokenizer

DEFAULT_PRESET = "small"
STAGING_DIR = ".staging"  # checkpoints are written here, then renamed into the output directory
TOKENIZER_MAX_ROWS = 2_000_000  # rows of a streamed corpus read to train a tokenizer


# ================================================================ Trainer additions


class SpikeLMTrainer(Trainer):
    """Trainer with atomic checkpoints and bits per byte. `held_out_tokens` / `held_out_bytes` describe the
    whole held-out text, so bits per byte = eval loss / ln 2 * tokens / bytes."""

    def __init__(self, *args, held_out_tokens: int, held_out_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.held_out_tokens, self.held_out_bytes = held_out_tokens, held_out_bytes
        self._saving_aside = False

    def _get_output_dir(self, trial):
        if self._saving_aside:  # while a checkpoint is being written, Trainer writes into the staging dir
            return os.path.join(self.args.output_dir, STAGING_DIR)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(self.args.output_dir, STAGING_DIR)
        staged, final = os.path.join(staging, name), os.path.join(self.args.output_dir, name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a killed run was writing
        self.accelerator.wait_for_everyone()
        self._saving_aside = True
        try:
            super()._save_checkpoint(model, trial)  # every rank writes its part (model, optimizer, RNG states)
        finally:
            self._saving_aside = False
        self.accelerator.wait_for_everyone()  # ... and all of them have finished before it goes live
        if self.args.should_save:
            if os.path.exists(final):  # the same step saved again: swap, never leave `final` half-written
                old = final + ".old"
                os.replace(final, old)
                os.replace(staged, final)
                shutil.rmtree(old)
            else:
                os.replace(staged, final)  # atomic on one file system
            os.rmdir(staging)
            rotate_checkpoints(output_dir=self.args.output_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        loss = output.metrics.get(f"{prefix}_loss")
        if loss is not None:
            output.metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 100.0))
            output.metrics[f"{prefix}_bits_per_byte"] = bits_per_byte(loss, self.held_out_tokens,
                                                                       self.held_out_bytes)
        return output


class EnergyCallback(TrainerCallback):
    """At each evaluation, count the model's operations on one held-out block and log the energy per token,
    the synaptic operations per token and the firing rate (spikelm.energy)."""

    def __init__(self, trainer: Trainer, input_ids: list[int]):
        self.trainer = trainer
        self.input_ids = torch.tensor([input_ids])

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        with count_inference(model) as counter:
            model(input_ids=self.input_ids.to(model.device), use_cache=False)
        report = counter.report()
        energy = {"eval_pj_per_token": report["pj_per_token"], "eval_ac_per_token": report["ac_per_token"],
                  "eval_mac_per_token": report["mac_per_token"], "eval_firing_rate": report["firing_rate"]}
        if metrics is not None:
            metrics.update(energy)  # returned by trainer.evaluate()
        self.trainer.log(energy)  # the progress bar and the log history


# ================================================================ building the pieces


def _resolve_tokenizer(args, corpus, output: Path, vocab_size: int):
    """--tokenizer, else the fine-tuned model's, else one already in the output dir (a resumed run), else train
    one on the training part of the corpus."""
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    elif args.model:
        tokenizer = load_tokenizer(args.model)
    elif has_tokenizer(output):
        return load_tokenizer(output)
    else:
        print(f"training a {vocab_size}-token SentencePiece tokenizer on {corpus.source}")
        return train_tokenizer(iter_texts(corpus.train, TOKENIZER_MAX_ROWS), output, vocab_size)
    tokenizer.save_pretrained(output)
    return tokenizer


def gpt2_config(settings: dict, tokenizer, block_size: int):
    """A GPT-2 of the same width, depth, heads, MLP and vocabulary as a spikelm preset. No dropout: the
    spiking model has none, and the comparison is at an equal, short training budget."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(tokenizer), n_embd=settings["hidden_size"], n_layer=settings["num_hidden_layers"],
                      n_head=settings["num_attention_heads"], n_inner=settings.get("intermediate_size"),
                      n_positions=max(1024, block_size), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)


def _build_model(args, settings: dict, tokenizer):
    if args.model:  # fine-tuning: the saved weights, config and all
        if not Path(args.model, "config.json").exists():
            raise SpikeLMError(f"no saved model in {args.model}: pass --model a directory written by "
                               f"`spikelm train` or save_pretrained")
        model = AutoModelForCausalLM.from_pretrained(args.model)
        if len(tokenizer) > model.config.vocab_size:
            raise SpikeLMError(f"the tokenizer has {len(tokenizer)} tokens but the model {args.model} only "
                               f"{model.config.vocab_size}: fine-tune with the model's own tokenizer")
        return model
    settings.pop("vocab_size")  # the tokenizer decides
    if getattr(args, "arch", "spikelm") == "gpt2":
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel(gpt2_config(settings, tokenizer, args.block_size))
    for field in ("attention_type", "time_steps"):
        if getattr(args, field) is not None:
            settings[field] = getattr(args, field)
    config = SpikeLMConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **settings)
    from .modeling_spikelm import SpikeLMForCausalLM

    return SpikeLMForCausalLM(config)


def _training_arguments(args) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps if args.max_steps else -1,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        adam_beta2=0.95,  # steadier with small batches
        max_grad_norm=args.max_grad_norm,
        bf16=cuda and torch.cuda.is_bf16_supported(),  # spikes are exact in bf16; fp16 overflows the membrane
        use_cpu=not cuda,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        eval_on_start=True,  # the untrained (or not yet fine-tuned) model's held-out loss, to compare with
        prediction_loss_only=True,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        seed=args.seed,
        data_seed=args.seed,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        report_to="none",
    )


# ================================================================ the `spikelm train` command


def add_arguments(parser):
    data = parser.add_argument_group("data")
    data.add_argument("--corpus", default=None,
                      help="text file, folder of text files, .jsonl file or dataset saved with save_to_disk "
                           "(default: the bundled Tiny Shakespeare)")
    data.add_argument("--text-field", default="text", help="text field of JSON records / dataset rows")
    data.add_argument("--streaming", action="store_true",
                      help="stream the corpus instead of loading it (large corpora; needs --max-steps)")
    data.add_argument("--block-size", type=int, default=128, help="tokens per training sequence")
    data.add_argument("--held-out-fraction", type=float, default=0.1, help="share of rows held out for evaluation")
    data.add_argument("--max-eval-blocks", type=int, default=64, help="held-out blocks scored at each evaluation")

    model = parser.add_argument_group("model")
    model.add_argument("--output", required=True, help="directory for checkpoints and the final model")
    model.add_argument("--preset", default=None, help=f"model size: {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    model.add_argument("--model", default=None, help="fine-tune this saved spikelm directory instead")
    model.add_argument("--tokenizer", default=None,
                       help="tokenizer directory (default: the model's, the output dir's, or a new one)")
    model.add_argument("--vocab-size", type=int, default=None, help="size of a newly trained tokenizer "
                                                                    "(default: the preset's)")
    model.add_argument("--arch", choices=("spikelm", "gpt2"), default="spikelm",
                       help="gpt2: a Hugging Face GPT2LMHeadModel of the preset's width, depth and heads, trained "
                            "by the same pipeline (the ANN reference and default distillation teacher)")
    model.add_argument("--attention-type", choices=("ssa", "sdsa"), default=None)
    model.add_argument("--compile-neurons", action="store_true",
                       help="fuse the neuron loops with torch.compile (faster steps after a one-off compilation)")
    model.add_argument("--time-steps", type=int, default=None)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max-steps", type=int, default=None, help="optimiser steps (default: one epoch)")
    optim.add_argument("--epochs", type=float, default=1.0)
    optim.add_argument("--batch-size", type=int, default=16, help="blocks per step and process")
    optim.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    optim.add_argument("--lr", type=float, default=3e-3)
    optim.add_argument("--lr-scheduler", default="cosine")
    optim.add_argument("--warmup", type=float, default=0.05, help="warm-up steps (a number < 1: a share of all)")
    optim.add_argument("--weight-decay", type=float, default=0.01)
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    optim.add_argument("--seed", type=int, default=0)

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--eval-steps", type=int, default=100)
    run_group.add_argument("--save-steps", type=int, default=200)
    run_group.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept")
    run_group.add_argument("--logging-steps", type=int, default=10)
    run_group.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")


def run(args, callbacks=()) -> int:
    """Train; `callbacks`: extra TrainerCallbacks (from Python)."""
    train(args, callbacks)
    return 0


def train(args, callbacks=(), build_model=None, trainer_class=None, trainer_kwargs=None):
    """The `spikelm train` pipeline; returns the Trainer after training and the final evaluation.

    build_model(args, settings, tokenizer) replaces the default model (the ANN twin of `spikelm convert`);
    trainer_class / trainer_kwargs replace SpikeLMTrainer (distillation)."""
    if args.model and args.preset:
        raise SpikeLMError("--preset and --model exclude each other: --model fine-tunes a saved model, whose size "
                           "is fixed")
    settings = preset(args.preset or DEFAULT_PRESET)  # an unknown name fails here, before any work
    if args.streaming and not args.max_steps:
        raise SpikeLMError("--streaming needs --max-steps: a stream has no known length")
    output = Path(args.output)
    training_args = _training_arguments(args)  # sets up the processes (DDP) too

    with quiet_datasets():
        corpus = load_corpus(args.corpus, args.text_field, args.held_out_fraction, args.streaming)
        with training_args.main_process_first(desc="tokenizer"):  # rank 0 trains and saves, the others load it
            tokenizer = _resolve_tokenizer(args, corpus, output, args.vocab_size or settings["vocab_size"])
        with training_args.main_process_first(desc="tokenising"):  # rank 0 fills the datasets cache
            blocks = prepare_blocks(corpus, tokenizer, args.block_size, args.max_eval_blocks)
    set_seed(args.seed)  # the same initial weights in every run and on every rank
    if getattr(args, "compile_neurons", False):
        from .neurons import enable_compiled_kernels

        enable_compiled_kernels()
    model = (build_model or _build_model)(args, settings, tokenizer)

    trainer = (trainer_class or SpikeLMTrainer)(
        model=model, args=training_args, train_dataset=blocks.train, eval_dataset=blocks.held_out,
        processing_class=tokenizer, callbacks=list(callbacks), held_out_tokens=blocks.held_out_tokens,
        held_out_bytes=blocks.held_out_bytes, **(trainer_kwargs or {}))
    if model.config.model_type == "spikelm" and model.config.neuron_type != "qcfs":
        trainer.add_callback(EnergyCallback(trainer, blocks.held_out[0]["input_ids"]))
    trainer.blocks = blocks  # for callers that evaluate more models on the same held-out blocks

    checkpoint = get_last_checkpoint(args.output) if args.resume and output.is_dir() else None
    if args.resume and checkpoint is None and trainer.is_world_process_zero():
        print(f"no checkpoint in {args.output}: starting from the beginning")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model()  # model (safetensors) + tokenizer, loadable with the Auto classes
    trainer.save_state()  # trainer_state.json: the log history
    if trainer.is_world_process_zero():
        first = next(entry for entry in trainer.state.log_history if "eval_bits_per_byte" in entry)
        tokens_per_second = result.metrics.get("train_samples_per_second", 0.0) * args.block_size
        summary = {**metrics, "train_tokens_per_second": tokens_per_second,
                   "start_eval_bits_per_byte": first["eval_bits_per_byte"], "global_step": trainer.state.global_step,
                   "world_size": training_args.world_size, "resumed_from": checkpoint}
        (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        energy = (f"; {metrics['eval_pj_per_token']:.0f} pJ/token, firing rate {metrics['eval_firing_rate']:.3f}"
                  if "eval_pj_per_token" in metrics else "")
        print(f"held-out bits per byte {metrics['eval_bits_per_byte']:.3f} (at the start "
              f"{first['eval_bits_per_byte']:.3f}), perplexity {metrics['eval_perplexity']:.2f}; "
              f"{tokens_per_second:.0f} training tokens/s{energy}; saved to {args.output}")
    return trainer
