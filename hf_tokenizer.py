"""The tokenizer as Hugging Face files: tokenizer.json and tokenizer_config.json (transformers 5 puts a chat
template in chat_template.jinja), so that transformers.AutoTokenizer.from_pretrained(folder) encodes text to the ids LightGPT uses.

- Built from the tiktoken encoding a model was trained with (r50k/p50k/cl100k/o200k, a .tiktoken file or
  bytes) by transformers' TikTokenConverter: the same byte-level BPE ranks, the same split pattern, and
  tiktoken's rule of looking a whole piece up before merging. Special tokens keep their ids.
- A chat model (chat.ChatTokenizer: <|im_start|>, <|im_end|>, <|pad|> after the base vocabulary) also
  gets a Jinja chat template that renders chat.render_conversation's text, so apply_chat_template(...,
  add_generation_prompt=True) gives chat.render_prompt's ids (tests check both against the renderer).
- As in every Hugging Face tokenizer, special-token text inside a string is the special token unless
  the call says split_special_tokens=True; LightGPT's own tokenizer always reads text as text.
- transformers is an optional extra (requirements-hf.txt); without it, one line names the install.
"""

from __future__ import annotations

import importlib.util
import os

import tiktoken

import data
from chat import ROLES, TOOL_ROLE, ChatTokenizer
from common import UserError

HF_INSTALL = "pip install -r requirements-hf.txt"


def _missing() -> list[str]:
    return [name for name in ("transformers", "tokenizers") if importlib.util.find_spec(name) is None]


def hf_available() -> bool:
    return not _missing()


def require_transformers(what: str) -> None:
    """One line naming the install when transformers (and its tokenizers) is missing."""
    missing = _missing()
    if missing:
        raise UserError(f"{what} needs {' and '.join(missing)} (an optional extra): {HF_INSTALL}")


def chat_template(eot: str) -> str:
    """Jinja for chat.render_conversation / render_prompt: end-of-text, then per message
    <|im_start|>role\\ncontent<|im_end|>\\n; with add_generation_prompt, <|im_start|>assistant\\n. An assistant's
    tool_calls follow its content, one line each, as serve.py renders them (chat.tool_call_text; arguments as
    OpenAI's JSON text or as a dict, transformers' convention); a tool's result is a turn of role tool."""
    roles = ", ".join(repr(role) for role in (*ROLES, TOOL_ROLE))
    return (
        f"{{{{ {eot!r} }}}}"
        "{% for message in messages %}"
        f"{{% if message['role'] not in [{roles}] %}}"
        "{{ raise_exception('LightGPT chats know the roles system, user, assistant and tool, not ' + message['role']) }}"
        "{% endif %}"
        "{% if message.get('tool_calls') and message['role'] != 'assistant' %}"
        "{{ raise_exception('only an assistant message makes tool calls, not a ' + message['role'] + ' message') }}"
        "{% endif %}"
        "{% set content = message['content'] if message['content'] is string or not message['content'] "
        "else (message['content'] | map(attribute='text') | join('')) %}"  # a list of text parts, as serve.py joins it
        "{% set turn = namespace(parts=[content] if content else []) %}"
        "{% for call in message.get('tool_calls') or [] %}"
        "{% set arguments = call['function']['arguments'] %}"
        "{% set turn.parts = turn.parts + ['{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": '"
        " + (arguments if arguments is string else (arguments | tojson)) + '}'] %}"
        "{% endfor %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + (turn.parts | join('\\n')) + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def _converter(encoding: tiktoken.Encoding):
    """transformers' TikTokenConverter reading the encoding's ranks from memory instead of a file, with the
    special tokens in the BPE vocabulary at their ids: adding them afterwards then keeps those ids (a plain
    add numbers them after the ranks, and cl100k's, for one, leave gaps before theirs)."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        def load_tiktoken_bpe(self, _):
            return encoding._mergeable_ranks

        def tokenizer(self):
            vocabulary, merges = self.extract_vocab_merges_from_model(None)
            vocabulary.update(encoding._special_tokens)
            return Tokenizer(BPE(vocabulary, merges, fuse_unk=False, ignore_merges=True))

    # With no merges (the byte encoding) any split gives the same ids; one character a piece also keeps a
    # typed special token from being one piece that the vocabulary's whole-piece lookup would match.
    single_bytes = all(len(token) == 1 for token in encoding._mergeable_ranks)
    return Converter(pattern=r"\S|\s" if single_bytes else encoding._pat_str)


def hf_tokenizer(encoding_spec: str, chat: bool = False):
    """A transformers PreTrainedTokenizerFast giving data.load_encoding(encoding_spec)'s ids (plus the
    ChatML tokens and template when `chat`)."""
    require_transformers("the Hugging Face tokenizer files")
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    base = data.load_encoding(encoding_spec)
    encoding = ChatTokenizer(base).encoding if chat else base
    tokenizer = _converter(encoding).converted()
    specials = sorted(encoding._special_tokens, key=encoding._special_tokens.get)
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in specials])
    eot = data.ENDOFTEXT
    settings = dict(bos_token=eot, eos_token=eot, clean_up_tokenization_spaces=False)
    if chat:
        settings.update(eos_token="<|im_end|>", pad_token="<|pad|>", chat_template=chat_template(eot))
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **settings)
    for token in specials:  # typed as text, each special token's characters are ordinary text, as in ours
        if hf(token, split_special_tokens=True)["input_ids"] != encoding.encode_ordinary(token):
            raise UserError(f"the Hugging Face tokenizer of {encoding_spec} reads a typed {token} as the special "
                            f"token: its split pattern keeps the text whole")
    return hf


def save_tokenizer(folder: str, encoding_spec: str, eot_id: int, vocabulary_size: int, chat: bool = False) -> list[str]:
    """Write the tokenizer files into `folder` (an export: its weights' end-of-text id and vocabulary size
    are checked against the tokenizer's), read them back and check a sample's ids
    against the encoding's. Returns the files written."""
    hf = hf_tokenizer(encoding_spec, chat)
    largest = max(hf.get_vocab().values())
    if hf.convert_tokens_to_ids(data.ENDOFTEXT) != eot_id or largest >= vocabulary_size:
        raise UserError(f"the tokenizer {encoding_spec} does not match the weights: end-of-text "
                        f"{hf.convert_tokens_to_ids(data.ENDOFTEXT)} (the weights': {eot_id}), ids up to {largest} "
                        f"(the weights hold {vocabulary_size})")
    before = set(os.listdir(folder))
    hf.save_pretrained(folder)
    from transformers import PreTrainedTokenizerFast  # AutoTokenizer would read config.json's remote code first

    sample = "Tokenizer check: naïve café, 🙂, def f(x): return x  # <|im_end|>\n"
    expected = data.load_encoding(encoding_spec).encode_ordinary(sample)
    if PreTrainedTokenizerFast.from_pretrained(folder)(sample, split_special_tokens=True)["input_ids"] != expected:
        raise UserError(f"the tokenizer files written for {encoding_spec} read back with other ids")
    return sorted(set(os.listdir(folder)) - before)

