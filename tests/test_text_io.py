"""Text in and out: tokenizer prompts, stop strings, chat templates and `jamba generate`."""

import json
import shutil
import subprocess

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import jamba_jax
from hf_reference import make_checkpoint
from jamba_jax.chat_template import JAMBA_15_TEMPLATE, load_chat_template, render_chat

CORPUS = ["the quick brown fox jumps over the lazy dog", "a journey of a thousand miles begins with one step",
          "to be or not to be that is the question"] * 20


def byte_level_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("text")
    make_checkpoint(directory, seed=2, vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1,
                    attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, eos_token_id=None)
    byte_level_tokenizer(300).save(str(directory / "tokenizer.json"))
    return directory


def test_text_prompts_and_stop_strings(checkpoint):
    model = jamba_jax.load(checkpoint)
    result = jamba_jax.generate(model, ["the quick", "to be"], max_new_tokens=12)
    ids = [model.tokenizer.encode(p).ids for p in ("the quick", "to be")]
    assert result.tokens == jamba_jax.generate(model, ids, max_new_tokens=12).tokens
    assert result.text == [model.tokenizer.decode(t) for t in result.tokens]
    stop = result.text[0][4:6]  # a stop string that occurs in row 0's continuation
    cut = jamba_jax.generate(model, ["the quick", "to be"], max_new_tokens=12, stop=[stop])
    assert cut.text[0] == result.text[0][:result.text[0].find(stop)]
    assert stop not in model.tokenizer.decode(cut.tokens[0])
    assert cut.tokens[0] == result.tokens[0][:len(cut.tokens[0])]


def test_jamba_15_fallback_template():
    text = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == ("<|startoftext|><|bom|><|system|> Be brief.<|eom|><|bom|><|user|> Hi<|eom|>"
                    "<|bom|><|assistant|>")
    with pytest.raises(ValueError, match="message 0 must be a dict"):
        render_chat(["hi"])


def test_checkpoint_template_renders_like_hf(tmp_path):
    from transformers import PreTrainedTokenizerFast

    template = ("{% for m in messages %}{% if m['role'] == 'user' %}[U] {{ m['content'] | trim }}\n"
                "{% else %}[A] {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}[A]{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    messages = [{"role": "user", "content": " hello "}, {"role": "assistant", "content": "hey"},
                {"role": "user", "content": "bye"}]
    hf = PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(270), eos_token="</s>", bos_token="<s>")
    expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    ours_template, special = load_chat_template(tmp_path)
    assert render_chat(messages, ours_template, special) == expected
    assert load_chat_template(None)[0] == JAMBA_15_TEMPLATE


def test_chat_uses_template(checkpoint, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint, directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": "Q: {{ messages[-1]['content'] }} A:"}))
    model = jamba_jax.load(directory)
    got = jamba_jax.chat(model, [{"role": "user", "content": "to be"}], max_new_tokens=5)
    want = jamba_jax.generate(model, [model.tokenizer.encode("Q: to be A:", add_special_tokens=False).ids],
                              max_new_tokens=5)
    assert got.tokens == want.tokens


def test_cli_generate_streams_text(checkpoint):
    exe = shutil.which("jamba")
    run = subprocess.run([exe, "generate", "--checkpoint", str(checkpoint), "--prompt", "the quick",
                          "--max-new-tokens", "10"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    expected = jamba_jax.generate(jamba_jax.load(checkpoint), "the quick", max_new_tokens=10).text[0]
    assert run.stdout == expected + "\n"
    assert "tok/s" in run.stderr


def test_cli_generate_bad_checkpoint_is_one_line(tmp_path):
    exe = shutil.which("jamba")
    run = subprocess.run([exe, "generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr and run.stderr.count("\n") == 1
    assert "missing: not a directory" in run.stderr
