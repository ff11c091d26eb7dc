"""Training a spikelm model (from scratch, or fine-tuning a saved one) with transformers.Trainer.

    from spikelm.training import TrainingOptions, build_config, prepare_data, train

    options = TrainingOptions(output="runs/small", max_steps=500)
    data = prepare_data(options, vocab_size=1024)           # the bundled corpus, a tokenizer trained on it
    trainer = train(build_config("small", data.tokenizer), data, options)

`spikelm train` (spikelm/cli/train.py) is these three calls. Trainer (accelerate underneath) does the
schedule, gradient accumulation, clipping, mixed precision (bf16 on GPUs that have it, none on CPU), DDP/FSDP,
the progress bar and safetensors checkpoints. What spikelm adds:
- a tokenizer trained on the corpus when none is given (spikelm.tokenizer),
- held-out perplexity and bits per byte at every evaluation, and the energy per token and firing rate of the
  model on a held-out block (EnergyCallback),
- checkpoints that appear atomically: written aside, then renamed into place, so that a run killed while
  saving never leaves a half-written checkpoint-N for `resume` to pick up.
"""

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from .allocator import keep_freed_memory
from .configuration_spikelm import SpikeLMConfig
from .data import Blocks, Corpus, bits_per_byte, iter_texts, load_corpus, prepare_blocks, quiet_datasets
from .energy import count_inference
from .errors import SpikeLMError
from .loading import has_tokenizer, load_tokenizer
from .presets import preset
from .tokenizer import train_tokenizer

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


# ================================================================ options


@dataclass(frozen=True)
class TrainingOptions:
    """What a training run is told besides the model: data, optimisation and the run itself. Frozen: a caller
    derives a variant with dataclasses.replace, and train() never changes it."""

    output: str  # directory for checkpoints, the final model, results.json
    # data
    corpus: str | None = None  # text file, folder, .jsonl or saved dataset; None: the bundled corpus
    text_field: str = "text"
    streaming: bool = False  # stream the corpus (needs max_steps)
    block_size: int = 128  # tokens per training sequence
    held_out_fraction: float = 0.1
    max_eval_blocks: int = 64  # held-out blocks scored at each evaluation
    # optimisation
    max_steps: int | None = None  # None: one pass over `epochs`
    epochs: float = 1.0
    batch_size: int = 16  # blocks per step and process
    grad_accum: int = 1
    lr: float = 3e-3
    lr_scheduler: str = "cosine"
    warmup: float = 0.05  # steps; a number below 1 is a share of all steps
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    # the run
    eval_steps: int = 100
    save_steps: int = 200
    save_total_limit: int = 2
    logging_steps: int = 10
    resume: bool = False  # continue from the last complete checkpoint in `output`
    compile_neurons: bool = False  # fuse the neuron loops with torch.compile
    keep_freed_memory: bool = True  # on the CPU: each step reuses the memory the last one freed (spikelm.allocator)
    command: str | None = None  # the command line of this run, for the model card

    def __post_init__(self):
        if self.streaming and not self.max_steps:
            raise SpikeLMError("--streaming needs --max-steps: a stream has no known length")

    def training_arguments(self) -> TrainingArguments:
        """Trainer's arguments for these options (making them sets up the processes under DDP)."""
        cuda = torch.cuda.is_available()
        return TrainingArguments(
            output_dir=self.output,
            max_steps=self.max_steps if self.max_steps else -1,
            num_train_epochs=self.epochs,
            per_device_train_batch_size=self.batch_size,
            per_device_eval_batch_size=self.batch_size,
            gradient_accumulation_steps=self.grad_accum,
            learning_rate=self.lr,
            lr_scheduler_type=self.lr_scheduler,
            warmup_steps=self.warmup,
            weight_decay=self.weight_decay,
            adam_beta2=0.95,  # steadier with small batches
            max_grad_norm=self.max_grad_norm,
            bf16=cuda and torch.cuda.is_bf16_supported(),  # spikes are exact in bf16; fp16 overflows the membrane
            use_cpu=not cuda,
            eval_strategy="steps",
            eval_steps=self.eval_steps,
            eval_on_start=True,  # the untrained (or not yet fine-tuned) model's held-out loss, to compare with
            prediction_loss_only=True,
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            logging_steps=self.logging_steps,
            seed=self.seed,
            data_seed=self.seed,
            ddp_find_unused_parameters=False,
            dataloader_num_workers=0,
            report_to="none",
        )


# ================================================================ data and model


@dataclass
class TrainingData:
    """A corpus, its tokenizer and the packed blocks that training and evaluation read."""

    corpus: Corpus
    tokenizer: object  # a Hugging Face tokenizer
    blocks: Blocks


def prepare_data(options: TrainingOptions, tokenizer=None, vocab_size: int = 1024) -> TrainingData:
    """Load the corpus and pack it into blocks. `tokenizer`: a tokenizer or a directory holding one; without
    it, the one already in `options.output` (a resumed run), else a new SentencePiece tokenizer of `vocab_size`
    tokens trained on the training part of the corpus. The tokenizer is saved into `options.output`."""
    training_args = options.training_arguments()  # under DDP: rank 0 goes first where it writes
    output = Path(options.output)
    with quiet_datasets():
        corpus = load_corpus(options.corpus, options.text_field, options.held_out_fraction, options.streaming)
        with training_args.main_process_first(desc="tokenizer"):  # rank 0 trains and saves, the others load it
            if isinstance(tokenizer, (str, Path)):
                tokenizer = load_tokenizer(tokenizer)
            if tokenizer is not None and tokenizer.pad_token is None:  # GPT-2's and Llama's have none
                tokenizer.pad_token = tokenizer.eos_token
            if tokenizer is not None:
                tokenizer.save_pretrained(output)
            elif has_tokenizer(output):
                tokenizer = load_tokenizer(output)
            else:
                print(f"training a {vocab_size}-token SentencePiece tokenizer on {corpus.source}")
                tokenizer = train_tokenizer(iter_texts(corpus.train, TOKENIZER_MAX_ROWS), output, vocab_size)
        with training_args.main_process_first(desc="tokenising"):  # rank 0 fills the datasets cache
            blocks = prepare_blocks(corpus, tokenizer, options.block_size, options.max_eval_blocks)
    return TrainingData(corpus, tokenizer, blocks)


def build_config(preset_name: str, tokenizer, **overrides) -> SpikeLMConfig:
    """A SpikeLMConfig of a preset's size for `tokenizer` (its vocabulary and special tokens); `overrides`:
    config fields to change (attention_type, time_steps, ...), None values ignored."""
    settings = preset(preset_name)
    settings.pop("vocab_size")  # the tokenizer decides
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return SpikeLMConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **settings)


def gpt2_config(preset_name: str, tokenizer, block_size: int):
    """The GPT-2 matched in parameters to the spikelm model of a preset (spikelm.references)."""
    from .references import matched_gpt2_config

    return matched_gpt2_config(build_config(preset_name, tokenizer), block_size)


# ================================================================ training


def base_model(trainer, config_or_model) -> str | None:
    """What a run started from, for the model card: the teacher's name, else the fine-tuned model's."""
    teacher = getattr(trainer, "teacher", None)
    if teacher is not None:
        return teacher.name_or_path or None
    return None if isinstance(config_or_model, PretrainedConfig) else (config_or_model.name_or_path or None)


def write_card(output, model, metrics, data: TrainingData, options: TrainingOptions, base=None):
    """README.md in `output`: the Hub's model card, with the held-out figures and the energy on one block."""
    from .model_card import card_energy, write_model_card

    input_ids = torch.tensor([data.blocks.held_out[0]["input_ids"]])
    write_model_card(output, model.config, metrics=metrics, energy=card_energy(model, input_ids),
                     command=options.command, base_model=base,
                     corpus=f"`{options.corpus}`" if options.corpus else "the bundled Tiny Shakespeare corpus")


def train(config_or_model: PretrainedConfig | PreTrainedModel, data: TrainingData, options: TrainingOptions,
          trainer_class=SpikeLMTrainer, trainer_kwargs=None, callbacks=()) -> Trainer:
    """Train a model on `data`; save it, its tokenizer, trainer_state.json and results.json into
    `options.output`; return the Trainer after training and a final evaluation.

    config_or_model: a config (a new model with random weights, seeded by options.seed: the same on every
    rank and in every run) or a model (fine-tuning). trainer_class / trainer_kwargs: a SpikeLMTrainer
    subclass and its extra arguments (distillation); callbacks: extra TrainerCallbacks."""
    training_args = options.training_arguments()  # sets up the processes (DDP) too
    output = Path(options.output)
    tokenizer, blocks = data.tokenizer, data.blocks
    set_seed(options.seed)  # the same initial weights in every run and on every rank
    if options.keep_freed_memory and training_args.device.type == "cpu":
        keep_freed_memory()
    if options.compile_neurons:
        from .neurons import enable_compiled_kernels

        enable_compiled_kernels()
    if isinstance(config_or_model, PretrainedConfig):
        model = AutoModelForCausalLM.from_config(config_or_model)
    else:
        model = config_or_model
    if len(tokenizer) > model.config.vocab_size:
        raise SpikeLMError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                           f"{model.config.vocab_size}: train it with the model's own tokenizer")

    trainer = trainer_class(
        model=model, args=training_args, train_dataset=blocks.train, eval_dataset=blocks.held_out,
        processing_class=tokenizer, callbacks=list(callbacks), held_out_tokens=blocks.held_out_tokens,
        held_out_bytes=blocks.held_out_bytes, **(trainer_kwargs or {}))
    if model.config.model_type == "spikelm" and model.config.neuron_type != "qcfs":
        trainer.add_callback(EnergyCallback(trainer, blocks.held_out[0]["input_ids"]))

    checkpoint = get_last_checkpoint(options.output) if options.resume and output.is_dir() else None
    if options.resume and checkpoint is None and trainer.is_world_process_zero():
        print(f"no checkpoint in {options.output}: starting from the beginning")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model()  # model (safetensors) + tokenizer, loadable with the Auto classes
    trainer.save_state()  # trainer_state.json: the log history
    if trainer.is_world_process_zero():
        first = next(entry for entry in trainer.state.log_history if "eval_bits_per_byte" in entry)
        tokens_per_second = result.metrics.get("train_samples_per_second", 0.0) * options.block_size
        summary = {**metrics, "train_tokens_per_second": tokens_per_second,
                   "start_eval_bits_per_byte": first["eval_bits_per_byte"], "global_step": trainer.state.global_step,
                   "world_size": training_args.world_size, "resumed_from": checkpoint}
        (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_card(output, trainer.model, summary, data, options, base_model(trainer, config_or_model))
        energy = (f"; {math.ceil(metrics['eval_pj_per_token'])} pJ/token, firing rate "
                  f"{metrics['eval_firing_rate']:.3f}"
                  if "eval_pj_per_token" in metrics else "")
        print(f"held-out bits per byte {metrics['eval_bits_per_byte']:.3f} (at the start "
              f"{first['eval_bits_per_byte']:.3f}), perplexity {metrics['eval_perplexity']:.2f}; "
              f"{tokens_per_second:.0f} training tokens/s{energy}; saved to {options.output}")
    return trainer
