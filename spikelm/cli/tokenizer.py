"""`spikelm tokenizer`: train a SentencePiece tokenizer on a corpus, saved for AutoTokenizer.

    spikelm tokenizer --corpus my.txt --output runs/tok --vocab-size 4096
"""


def add_arguments(parser):
    parser.add_argument("--corpus", default=None,
                        help="text file, folder of text files, .jsonl file or saved dataset (default: the bundled "
                             "Tiny Shakespeare)")
    parser.add_argument("--output", required=True, help="directory to save the tokenizer in")
    parser.add_argument("--vocab-size", type=int, default=1024, help="number of tokens (default 1024)")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--text-field", default="text", help="text field of JSON records / dataset rows")


def run(args) -> int:
    from ..data import iter_texts, load_corpus, quiet_datasets
    from ..tokenizer import train_tokenizer

    with quiet_datasets():
        corpus = load_corpus(args.corpus, text_field=args.text_field)
        tokenizer = train_tokenizer(iter_texts(corpus.train), args.output, args.vocab_size, args.model_type)
    print(f"saved a {len(tokenizer)}-token {args.model_type} tokenizer to {args.output}")
    return 0
