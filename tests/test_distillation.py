import json
import math

import pytest
import torch

from spikelm import SpikeLMForCausalLM
from spikelm.distillation import distillation_loss
from conftest import shakespeare_text, tiny_config
from helpers import spikelm


def softmax(values, tau):
    exps = [math.exp(v / tau) for v in values]
    return [e / sum(exps) for e in exps]


def test_loss_equals_a_value_computed_by_hand():
    # two positions with labels (the last position has no next token), V = 3
    student = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, 9.0, 9.0]]])
    teacher = torch.tensor([[[0.0, 1.0, 0.0], [1.0, -1.0, 2.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[7, 1, 2]])  # the label at position 0 is never used (shifted away)
    alpha, tau = 0.3, 2.0
    ce, kl = 0.0, 0.0
    for position, target in ((0, 1), (1, 2)):
        s, t = student[0, position].tolist(), teacher[0, position].tolist()
        ce += -math.log(softmax(s, 1.0)[target])
        p_t, p_s = softmax(t, tau), softmax(s, tau)
        kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    expected = (1 - alpha) * ce / 2 + alpha * tau ** 2 * kl / 2
    loss = distillation_loss(student, teacher, labels, alpha=alpha, temperature=tau)
    assert abs(loss.item() - expected) < 1e-6


def test_gradient_is_zero_for_identical_logits_at_alpha_one():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    loss = distillation_loss(logits, logits.detach().clone(), labels, alpha=1.0, temperature=3.0)
    loss.backward()
    assert loss.item() < 1e-6
    assert logits.grad.abs().max() < 1e-6
    # and not zero when the logits differ
    other = torch.randn(2, 5, 11, requires_grad=True)
    distillation_loss(other, logits.detach(), labels, alpha=1.0, temperature=3.0).backward()
    assert other.grad.abs().max() > 1e-4


def test_a_few_distillation_steps_lower_the_kl_to_the_teacher():
    torch.manual_seed(0)
    teacher = SpikeLMForCausalLM(tiny_config("ssa")).eval()
    student = SpikeLMForCausalLM(tiny_config("sdsa"))
    batch = torch.randint(0, 48, (8, 24))
    with torch.no_grad():
        teacher_logits = teacher(batch, use_cache=False).logits

    def kl():
        with torch.no_grad():
            return distillation_loss(student(batch, use_cache=False).logits, teacher_logits, batch, alpha=1.0,
                                     temperature=1.0).item()

    before = kl()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for _ in range(20):
        loss = distillation_loss(student(batch, use_cache=False).logits, teacher_logits, batch, alpha=0.9,
                                 temperature=2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert kl() < 0.7 * before


# ---------------------------------------------------------------- the commands (in this process)


TINY = ["--preset", "tiny", "--block-size", "32", "--batch-size", "8", "--max-eval-blocks", "4",
        "--eval-steps", "1000", "--save-steps", "1000"]


def test_gpt2_teacher_distill_and_convert_commands(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from spikelm.conversion import is_spike_driven

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_text(30_000))
    teacher = tmp_path / "gpt2"
    run = spikelm("train", "--arch", "gpt2", "--corpus", corpus, "--output", teacher, "--max-steps", 8, *TINY)
    assert run.returncode == 0, run.stderr[-1500:]
    assert AutoModelForCausalLM.from_pretrained(teacher).config.model_type == "gpt2"

    student = tmp_path / "student"
    run = spikelm("distill", "--teacher", teacher, "--corpus", corpus, "--output", student, "--max-steps", 6,
                   "--grad-accum", 2, "--alpha", 0.7, "--temperature", 2.0, *TINY)
    assert run.returncode == 0, run.stderr[-1500:]
    results = json.loads((student / "results.json").read_text())
    assert results["global_step"] == 6 and results["eval_bits_per_byte"] < results["start_eval_bits_per_byte"]
    assert AutoModelForCausalLM.from_pretrained(student).config.model_type == "spikelm"

    converted = tmp_path / "converted"
    run = spikelm("convert", "--corpus", corpus, "--output", converted, "--max-steps", 8, *TINY)
    assert run.returncode == 0, run.stderr[-1500:]
    report = json.loads((converted / "conversion.json").read_text())
    assert abs(report["gap_bits_per_byte"]) < 1.0 and report["time_steps"] == 2
    snn = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert snn.config.neuron_type == "if" and is_spike_driven(snn, torch.randint(0, 100, (1, 16)))


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_text(30_000))
    teacher = tmp_path / "teacher"  # a saved GPT-2 with a 512-token vocabulary (random weights: never run)
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2)).save_pretrained(teacher)
    other = tmp_path / "other-tokenizer"
    assert spikelm("tokenizer", "--corpus", corpus, "--output", other, "--vocab-size", 400).returncode == 0
    run = spikelm("distill", "--teacher", teacher, "--tokenizer", other, "--corpus", corpus,
                  "--output", tmp_path / "student", "--max-steps", 2, *TINY)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert "vocabulary" in lines[-1] and "Traceback" not in run.stderr


def test_chunked_loss_equals_the_unchunked_one():
    torch.manual_seed(0)
    V = 301
    student = (torch.randn(3, 37, V, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.randn(3, 37, V, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (3, 37))
    labels[1, 5:9] = -100  # positions without a label count in neither term
    whole = distillation_loss(student, teacher, labels, alpha=0.6, temperature=2.0, chunk_positions=None)
    (whole_grad,) = torch.autograd.grad(whole, student)
    for chunk in (1, 5, 16, 36, 100):
        chunked = distillation_loss(student, teacher, labels, alpha=0.6, temperature=2.0, chunk_positions=chunk)
        (chunked_grad,) = torch.autograd.grad(chunked, student)
        assert abs(chunked.item() - whole.item()) < 1e-6
        assert (chunked_grad - whole_grad).abs().max() < 1e-6
    # float32 logits (what the models give): equal within 1e-6 too, and alpha = 0 is the plain cross-entropy
    student32, teacher32 = student.detach().float(), teacher.float()
    for alpha in (0.0, 0.5):
        unchunked = distillation_loss(student32, teacher32, labels, alpha=alpha, chunk_positions=None).item()
        chunked = distillation_loss(student32, teacher32, labels, alpha=alpha, chunk_positions=7).item()
        assert abs(chunked - unchunked) < 1e-6 * max(1.0, abs(unchunked))
    keep = labels[:, 1:] != -100
    ce = torch.nn.functional.cross_entropy(student32[:, :-1][keep], labels[:, 1:][keep])
    assert distillation_loss(student32, teacher32, labels, alpha=0.0, chunk_positions=4).item() == \
        pytest.approx(ce.item(), rel=1e-6)


def byte_level_bpe(texts, vocab_size=400):
    """A GPT-2-style byte-level BPE tokenizer trained here with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")


def test_a_byte_level_bpe_teacher_end_to_end(tmp_path):
    """The student adopts a teacher's byte-level BPE tokenizer (not spikelm's SentencePiece), trains, saves,
    loads and generates with it."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    text = shakespeare_text(30_000)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    tokenizer = byte_level_bpe([text])
    teacher = tmp_path / "teacher"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    student = tmp_path / "student"
    run = spikelm("distill", "--teacher", teacher, "--corpus", corpus, "--output", student, "--max-steps", 2, *TINY)
    assert run.returncode == 0, run.stderr[-1500:]
    saved = AutoTokenizer.from_pretrained(student)
    assert saved.get_vocab() == tokenizer.get_vocab() and saved.eos_token == "<|endoftext|>"
    results = json.loads((student / "results.json").read_text())
    assert math.isfinite(results["eval_bits_per_byte"]) and results["global_step"] == 2
    run = spikelm("generate", "--model", student, "--prompt", "ROMEO:", "--max-new-tokens", 5, "--json")
    assert run.returncode == 0, run.stderr[-1500:]
    assert json.loads(run.stdout)["text"].startswith("ROMEO:")


def test_distill_init_from_teacher_starts_from_its_weights(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    text = shakespeare_text(30_000)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    tokenizer = byte_level_bpe([text])
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_inner=64,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    student = tmp_path / "student"
    run = spikelm("distill", "--teacher", teacher, "--init-from-teacher", "--time-steps", 2, "--corpus", corpus,
                  "--output", student, "--max-steps", 1, "--lr", 1e-9, "--block-size", 32, "--batch-size", 4,
                  "--max-eval-blocks", 4, "--eval-steps", 1000, "--save-steps", 1000)
    assert run.returncode == 0, run.stderr[-1500:]
    model = AutoModelForCausalLM.from_pretrained(student)
    assert model.config.neuron_type == "if" and model.config.time_steps == 2 and model.config.hidden_size == 32
    # one step at a vanishing learning rate: the teacher's embeddings are still there
    embeddings = load_file(teacher / "model.safetensors")["transformer.wte.weight"]
    assert torch.allclose(model.model.embed_tokens.weight, embeddings, atol=1e-6)
    run = spikelm("distill", "--teacher", teacher, "--init-from-teacher", "--preset", "tiny", "--corpus", corpus,
                  "--output", tmp_path / "x", "--max-steps", 1)
    assert run.returncode == 2 and "drop --model and --preset" in run.stderr
