"""Write the local lm-evaluation-harness task data from the held-out tenth of the bundled Tiny Shakespeare.

    python eval/tasks/make_tasks.py            # writes eval/tasks/data/*.jsonl (deterministic)

The held-out part is the last 10% of the corpus' lines, as `spikelm train` holds it out, so a model trained
by spikelm has not seen it:
- shakespeare_heldout.jsonl: passages of at least 1,000 characters, cut at blank lines (whole speeches),
  for the rolling log-likelihood task (perplexity, bits per byte);
- shakespeare_next_line.jsonl: "which line follows these two?": the true next line of a speech and three
  lines of similar length from elsewhere in the held-out text, in a shuffled order.
"""

import argparse
import json
import random
from pathlib import Path

from spikelm.data import default_corpus

HERE = Path(__file__).resolve().parent


def held_out_lines(text, fraction=0.1):
    lines = text.splitlines()
    return lines[len(lines) - max(1, round(len(lines) * fraction)):]


def passages(lines, min_chars=1000, limit=40):
    """Consecutive speeches joined until a passage has `min_chars` characters."""
    docs, current = [], []
    for line in lines + [""]:
        current.append(line)
        if not line and sum(len(x) + 1 for x in current) >= min_chars:
            docs.append("\n".join(current).strip() + "\n")
            current = []
    return docs[:limit]


def next_line_items(lines, count=200, seed=0):
    rng = random.Random(seed)
    # speech lines: non-empty, not a speaker's name ("ROMEO:")
    speech = [i for i, line in enumerate(lines) if line.strip() and not line.rstrip().endswith(":")]
    candidates = [i for i in speech if i >= 2 and i - 1 in speech and i - 2 in speech]
    items = []
    for i in rng.sample(candidates, min(count, len(candidates))):
        answer = lines[i]
        # distractors: other speech lines of similar length, not near i, not equal to the answer
        pool = [lines[j] for j in speech if abs(j - i) > 5 and lines[j] != answer
                and abs(len(lines[j]) - len(answer)) <= 10]
        if len(pool) < 3:
            continue
        choices = rng.sample(pool, 3) + [answer]
        rng.shuffle(choices)
        items.append({"context": lines[i - 2] + "\n" + lines[i - 1], "choices": choices,
                      "label": choices.index(answer)})
    return items


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(default_corpus()), help="default: the corpus spikelm ships")
    parser.add_argument("--output", default=str(HERE / "data"))
    args = parser.parse_args()
    lines = held_out_lines(Path(args.corpus).read_text(encoding="utf-8"))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    write_jsonl(output / "shakespeare_heldout.jsonl", [{"text": doc} for doc in passages(lines)])
    write_jsonl(output / "shakespeare_next_line.jsonl", next_line_items(lines))


if __name__ == "__main__":
    main()
