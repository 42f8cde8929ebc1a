"""A tiny random-init causal LM with a real tokenizer and chat template, built offline.

For tests and the offline CPU demo: no model hub is needed. The tokenizer is a byte-level BPE
trained on a small built-in text (so any input text tokenizes and decodes losslessly), the model
a 2-layer Llama with hidden size 64. The same arguments give the same files (seeded).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# A plain chat template in the Hugging Face format (Jinja); system, user and assistant turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_SPECIALS = ["<s>", "</s>", "<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>",
             "<|end|>"]

# Training text for the BPE merges: JSON punctuation and common English, so that JSON answers
# take few tokens. The content only shapes the merges; any text still encodes (byte level).
_BPE_TEXT = """\
Please carefully read the text below. Then, generate exactly one question along with four
answer choices designated as A, B, C, and D based on the provided text. Then, respond to the
question with the correct answer using only the corresponding letter label. Return the output
only as a JSON structure in this format:
{"question": "What is the main topic?", "options": ["A. Coffee", "B. Beer", "C. Tea", "D. Water"],
"answer": "A"}
{"statement": "Coffee contains caffeine.", "options": ["A. Yes", "B. No"], "answer": "A"}
{"instruction": "Make a cold brew coffee at home.", "ingredients": ["coffee", "water"],
"steps": ["Grind the beans.", "Steep for twelve hours."]}
{"instruction": "Summarize the following text.", "summary": "A short summary.",
"long_but_clean_text": "The long text."}
Text: The brewer added hops to the wort and let the beer ferment for two weeks before bottling.
How do I grind coffee beans for an espresso machine? Use a burr grinder and a fine setting.
The question, the answer, the options and the instruction are written in plain English text.
"""


def build_tiny_causal_lm(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_position_embeddings: int = 4096,
    overwrite: bool = False,
) -> Path:
    """Build (or reuse) a tiny Llama-style causal LM + tokenizer in ``out_dir``; return the path.

    ``out_dir`` can be passed to ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``. An existing complete build is reused unless ``overwrite``.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    marker = out / "tiny_build.json"
    params = {"seed": seed, "vocab_size": vocab_size, "hidden_size": hidden_size,
              "num_layers": num_layers, "max_position_embeddings": max_position_embeddings}
    if marker.is_file() and not overwrite:
        if json.loads(marker.read_text()) == params:
            return out
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_BPE_TEXT] * 4, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=_SPECIALS[4:],
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.model_max_length = max_position_embeddings
    hf_tok.save_pretrained(out)

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(out)
    marker.write_text(json.dumps(params))  # written last: its presence means a complete build
    logger.info("built tiny causal LM in %s", out)
    return out
