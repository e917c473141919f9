"""Prompts with an exact token count for a real tokenizer (special tokens included, as the server counts)."""

import json
from pathlib import Path

import pytest

from workloads.prompts import TokenizerError, TokenizerPrompts, prompt_synthesiser, synth_prompt

tokenizers = pytest.importorskip("tokenizers", reason="needs `tokenizers` (pip install tokenizers, or the vLLM extra)")

CORPUS = [
    "the energy of a token is the power of the device over its time",
    "water and carbon per token follow from the energy and the site",
    "a replica serves requests in batches; the clock sets the power",
] * 200


def _build(tmp_path: Path, style: str, bos: bool) -> Path:
    """A small trained tokenizer: byte-level BPE (GPT-2/Llama-3 style) or Metaspace BPE (SentencePiece/Llama-2
    style, words marked with "▁"); with ``bos`` its post-processor prepends <s> like Llama tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if style == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    out = tmp_path / f"{style}-{bos}"
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    }))
    return out


def _reference_count(directory: Path, text: str) -> int:
    """How a server counts the prompt: transformers' AutoTokenizer as vLLM loads it, else tokenizers."""
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(str(directory)).encode(text))
    except ImportError:
        from tokenizers import Tokenizer

        return len(Tokenizer.from_file(str(directory / "tokenizer.json")).encode(text).ids)


@pytest.mark.parametrize(("style", "bos"), [("bytelevel", False), ("bytelevel", True), ("metaspace", True)])
def test_prompts_encode_to_exactly_n_tokens(tmp_path: Path, style: str, bos: bool) -> None:
    directory = _build(tmp_path, style, bos)
    prompts = TokenizerPrompts(directory)
    assert prompts.special_tokens == int(bos)
    lengths = [1 + int(bos), 2 + int(bos), 3, 8, 33, 128, 511, 1500]
    for seed, n in enumerate(lengths):
        text = prompts(n, seed)
        assert _reference_count(directory, text) == n, (n, text[:80])
        assert prompts(n, seed) == text  # seeded
    assert prompts(64, 1) != prompts(64, 2)


def test_the_tokenizer_json_file_alone_gives_the_same_counts(tmp_path: Path) -> None:
    directory = _build(tmp_path, "bytelevel", True)
    from_file = TokenizerPrompts(directory / "tokenizer.json")
    assert from_file.special_tokens == 1
    for n in (2, 17, 300):
        assert _reference_count(directory, from_file(n, n)) == n


def test_a_prompt_shorter_than_the_special_tokens_is_refused(tmp_path: Path) -> None:
    prompts = TokenizerPrompts(_build(tmp_path, "bytelevel", True))
    with pytest.raises(TokenizerError, match=r"adds 1 special token\(s\), so the shortest prompt has 2"):
        prompts(1, 0)


def test_bad_tokenizer_paths(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found: give a model directory"):
        prompt_synthesiser(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="empty"):
        TokenizerPrompts(tmp_path / "empty")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"junk\.json"):
        TokenizerPrompts(tmp_path / "junk.json")
    assert prompt_synthesiser("word") is synth_prompt
    assert len(synth_prompt(9, 3).split()) == 9


def test_campaign_refuses_lengths_below_the_special_tokens(tmp_path: Path) -> None:
    from workloads.inputs import campaign_prompts
    from workloads.spec import CampaignSpec

    directory = _build(tmp_path, "bytelevel", True)
    spec = CampaignSpec.model_validate({
        "sweep": {"rate_rps": [1]},
        "workload": {"tokenizer": str(directory), "prompt_tokens": {"kind": "uniform", "low": 1, "high": 9}},
    })
    with pytest.raises(TokenizerError, match=r"1-token prompts, but .* adds 1 special token"):
        campaign_prompts(spec)
    ok = spec.model_copy(update={"workload": spec.workload.model_copy(
        update={"prompt_tokens": spec.workload.prompt_tokens.model_copy(update={"low": 2})})})
    assert campaign_prompts(ok).tokenizer == str(directory)
    # auto means the served model's tokenizer when the campaign knows it.
    auto = CampaignSpec.model_validate({"sweep": {"rate_rps": [1]}, "workload": {
        "prompt_tokens": {"kind": "fixed", "value": 5}}})
    p = campaign_prompts(auto, str(directory))
    assert p.tokenizer == str(directory) and _reference_count(directory, p.fn(5, 0)) == 5


def test_tokenizer_prompts_travel_to_a_generator_process_by_path(tmp_path: Path) -> None:
    import pickle

    prompts = TokenizerPrompts(_build(tmp_path, "bytelevel", bos=True))
    copy = pickle.loads(pickle.dumps(prompts))
    assert copy.path == prompts.path and copy(12, 5) == prompts(12, 5) and copy.count(copy(12, 5)) == 12


@pytest.mark.parametrize(("style", "bos"), [("word", False), ("bytelevel", False), ("bytelevel", True),
                                            ("metaspace", True)])
def test_shared_prefix_prompts_keep_exact_lengths_and_share_their_first_tokens(
    tmp_path: Path, style: str, bos: bool
) -> None:
    """Every prompt keeps the length drawn for it (as the server counts it), and its first tokens are the same in
    every request: the prefix, or all but the last token of a prompt no longer than it."""
    import pickle

    from workloads.prompts import SharedPrefixPrompts

    if style == "word":
        tokens, count = str.split, (lambda t: len(t.split()))
        base = prompt_synthesiser("word", shared_prefix_tokens=40)
    else:
        from tokenizers import Tokenizer

        directory = _build(tmp_path, style, bos)
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokens, count = (lambda t: tok.encode(t).ids), (lambda t: _reference_count(directory, t))
        base = prompt_synthesiser(str(directory), shared_prefix_tokens=40)
    assert isinstance(base, SharedPrefixPrompts) and base.special_tokens == int(bos)
    prompts = pickle.loads(pickle.dumps(base))  # as a load-generator process gets it
    long = [tokens(prompts(n, seed)) for seed, n in enumerate([41, 64, 200, 64])]
    assert [len(t) for t in long] == [41, 64, 200, 64]
    assert all(t[:40] == long[0][:40] for t in long)
    assert long[1][40:] != long[3][40:]  # the rest is the request's own
    short = prompts(12, 3)
    assert count(short) == 12 and tokens(short)[:11] == long[0][:11]
    assert prompt_synthesiser("word") is synth_prompt  # no prefix asked: the plain synthesiser
