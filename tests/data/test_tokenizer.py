"""SentencePiece tokenizer: llama2.c training settings, encode/decode, tokenizer.bin, refusals."""

from __future__ import annotations

import hashlib
import struct

import pytest
import sentencepiece as spm

from llamalit.data.synthetic import make_corpus
from llamalit.data.text_formats import read_records
from llamalit.data.tokenizer import (
    Tokenizer,
    TokenizerError,
    check_vocab_fits,
    fetch_tokenizer,
    parse_train_spec,
    read_llama2c_tokenizer_bin,
    train_tokenizer,
    write_llama2c_tokenizer_bin,
)


def test_trained_tokenizer_has_llama2c_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (512, 1, 2, -1)
    assert tok.sp.id_to_piece(0) == "<unk>"
    assert [tok.sp.id_to_piece(i) for i in (3, 258)] == ["<0x00>", "<0xFF>"]  # byte fallback pieces
    spec = tok.sp.serialized_model_proto()
    from sentencepiece import sentencepiece_model_pb2 as pb  # noqa: PLC0415

    proto = pb.ModelProto()
    proto.ParseFromString(spec)
    t = proto.trainer_spec
    assert t.model_type == pb.TrainerSpec.BPE and t.split_digits and t.byte_fallback
    assert t.allow_whitespace_only_pieces and t.character_coverage == 1.0
    assert proto.normalizer_spec.name == "identity"


def test_encode_decode_round_trip(tiny_tokenizer, synthetic_corpus):
    tok = tiny_tokenizer
    story = read_records(synthetic_corpus[1])[0]["story"]
    ids = tok.encode(story, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.bos_id not in ids[1:-1] and tok.eos_id not in ids[1:-1]
    assert tok.decode(ids) == story
    assert tok.encode(story, bos=False, eos=False) == ids[1:-1]
    assert tok.encode_batch([story, "Tom"], bos=True) == [ids[:-1], tok.encode("Tom", bos=True)]
    odd = "Zoë paid 1234 € — twice"  # unseen characters go through byte fallback
    assert tok.decode(tok.encode(odd)) == odd


def test_llama2c_tokenizer_bin(tiny_tokenizer, tmp_path):
    out = write_llama2c_tokenizer_bin(tiny_tokenizer.path, tmp_path / "tokenizer.bin")
    max_len, entries = read_llama2c_tokenizer_bin(out, tiny_tokenizer.vocab_size)
    sp = tiny_tokenizer.sp
    assert entries[1][1] == b"\n<s>\n" and entries[2][1] == b"\n</s>\n"
    for i in (0, 3, 300, 511):
        assert entries[i][1] == sp.id_to_piece(i).replace("\u2581", " ").encode()
        assert entries[i][0] == pytest.approx(sp.get_score(i))
    assert max_len == max(len(b) for _, b in entries)
    assert struct.unpack("<I", out.read_bytes()[:4])[0] == max_len


def test_vocab_must_fit_uint16():
    check_vocab_fits(65536)
    with pytest.raises(TokenizerError, match="vocab_size 65537 does not fit token dtype uint16"):
        check_vocab_fits(65537, source="big.model")
    with pytest.raises(TokenizerError, match="does not fit"):
        parse_train_spec("train:70000")
    with pytest.raises(TokenizerError, match="integer N"):
        parse_train_spec("train:lots")
    with pytest.raises(TokenizerError, match="at least 260"):
        parse_train_spec("train:100")
    assert parse_train_spec("train:4096") == 4096 and parse_train_spec("tok.model") is None


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="garbage.model: not a SentencePiece model"):
        Tokenizer(garbage)
    with pytest.raises(TokenizerError, match="no such file"):
        fetch_tokenizer(str(tmp_path / "nope.model"), tmp_path)


def test_fetch_tokenizer_from_url(http_server, tiny_tokenizer, tmp_path):
    data = tiny_tokenizer.path.read_bytes()
    http_server.files["/tok/tokenizer.model"] = data
    sha = hashlib.sha256(data).hexdigest()
    path = fetch_tokenizer(f"{http_server.url}/tok/tokenizer.model", tmp_path, sha256=sha)
    assert Tokenizer(path).sha256 == tiny_tokenizer.sha256 == sha
    with pytest.raises(TokenizerError, match="differs from the configured"):
        fetch_tokenizer(str(tiny_tokenizer.path), tmp_path, sha256="f" * 64)


def test_training_a_too_large_vocab_fails_cleanly(tmp_path):
    files = make_corpus(tmp_path / "c", 1, 20, seed=3)
    stories = [r["story"] for r in read_records(files[0])]
    with pytest.raises(TokenizerError, match="use a smaller N"):
        train_tokenizer(stories, 5000, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer([], 512, tmp_path / "t.model")


def test_loads_any_sentencepiece_model(tmp_path):
    """A unigram model trained outside llamalit loads just the same."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\nthe dog ran\n" * 50)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "u"), vocab_size=16,
                                   model_type="unigram", minloglevel=2)
    tok = Tokenizer(tmp_path / "u.model")
    assert tok.vocab_size == 16 and tok.decode(tok.encode("the cat ran")) == "the cat ran"
