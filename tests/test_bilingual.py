"""Bilingual corpus: deterministic, one language per document, built so the language matters; real-text loader."""
from __future__ import annotations

import re

import pytest

from helpers.tasks import bilingual

GERMAN_FUNCTION = {"der", "die", "das", "und", "ist", "nicht", "dass", "weil", "ein", "eine", "den", "sind"}
ENGLISH_FUNCTION = {"the", "and", "is", "not", "that", "because", "a", "an", "are", "does", "to"}


def _words(text: str) -> list[str]:
    return re.findall(r"[\wäöüßÄÖÜ]+", text.lower())


def test_generator_is_deterministic_and_seeded():
    a = bilingual.generate_corpus(50, seed=3)
    assert a == bilingual.generate_corpus(50, seed=3)
    assert a != bilingual.generate_corpus(50, seed=4)
    assert bilingual.evaluation_texts(5) == bilingual.evaluation_texts(5)


def test_documents_have_one_language_and_the_asked_length():
    docs = bilingual.generate_corpus(300, german_fraction=0.4, seed=0, min_chars=300, max_chars=700)
    share = sum(d.language == "de" for d in docs) / len(docs)
    assert 0.3 < share < 0.5
    for doc in docs:
        assert 200 <= len(doc.text) <= 700
        words = set(_words(doc.text))
        own, other = (GERMAN_FUNCTION, ENGLISH_FUNCTION) if doc.language == "de" else (ENGLISH_FUNCTION,
                                                                                        GERMAN_FUNCTION)
        assert words & own
        # "die"/"an" etc. are not shared by accident: no function word of the other language appears
        assert not (words & other) - {"an", "die", "a"}


def test_language_neutral_words_and_shared_prefixes_occur_in_both_languages():
    docs = bilingual.generate_corpus(400, seed=1)
    german = " ".join(d.text for d in docs if d.language == "de")
    english = " ".join(d.text for d in docs if d.language == "en")
    for name in ("Anna", "Berlin", "Paris"):
        assert name in german and name in english
    # verb stems shared by both languages, continued differently
    for de_word, en_word in (("findet", "finds"), ("organisiert", "organises"), ("testet", "tests")):
        assert de_word in german and en_word in english and de_word not in english and en_word not in german
    assert "Vorschläge" in german and "Vorschläge" not in english
    # German word order: verb-final subordinate clauses
    assert re.search(r"dass [^.,]+ (\w+t)\.", german)


def test_long_german_words_are_multi_token_for_a_small_bpe():
    from helpers.models.zoo import train_bpe_tokenizer

    docs = bilingual.generate_corpus(600, seed=0)
    tokenizer = train_bpe_tokenizer([d.text for d in docs], 512)
    pieces = [len(tokenizer(" " + word)["input_ids"]) for word in ("Vorschläge", "Zusammenarbeit",
                                                                   "Verantwortung", "Haushaltsplan")]
    assert min(pieces) >= 2


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        bilingual.generate_corpus(3, german_fraction=1.5)
    with pytest.raises(ValueError):
        bilingual.generate_document(__import__("random").Random(0), "fr")


def test_load_text_documents_packs_lines_from_a_local_file(tmp_path):
    path = tmp_path / "german.txt"
    lines = ["Das ist der erste Satz.", "", "Hier kommt der zweite Satz, etwas länger als der erste.",
             "Dritter Satz.", "x" * 50 + " " + "y" * 60, "Letzter Satz ohne Ende"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = bilingual.load_text_documents(path, min_chars=40, max_chars=80)
    # short lines are joined until min_chars, blank lines skipped, long ones cut on a word boundary
    assert docs == ["Das ist der erste Satz. Hier kommt der zweite Satz, etwas länger als der erste.",
                    "Dritter Satz. " + "x" * 50]
    assert all(40 <= len(d) <= 80 for d in docs)   # the trailing short line never reaches min_chars
    assert bilingual.load_text_documents(path, n_documents=1, min_chars=40, max_chars=80) == docs[:1]


def test_code_switching_inserts_foreign_noun_phrases_only():
    plain = bilingual.generate_corpus(100, seed=5, german_fraction=0.5)
    switched = bilingual.generate_corpus(100, seed=5, german_fraction=0.5, code_switch=0.3)
    english_in_german = sum(" the " in d.text for d in switched if d.language == "de")
    assert english_in_german > 10
    assert not any(" the " in d.text for d in plain if d.language == "de")
    # the frame of every sentence stays in the document's language
    for doc in switched:
        if doc.language == "de":
            assert not re.search(r"\b(does not|because|together)\b", doc.text)
        else:
            assert not re.search(r"\b(nicht|weil|gemeinsam)\b", doc.text)


def test_tokenize_documents_adds_bos_eos_and_masks_padding():
    from helpers.models.zoo import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([d.text for d in bilingual.generate_corpus(200, seed=0)], 400)
    tokens, mask = bilingual.tokenize_documents(tokenizer, ["Anna plant das Projekt.", "Tom"], 64)
    assert tokens.shape == mask.shape == (2, 64)
    assert tokens[0, 0] == tokenizer.bos_token_id and int(mask[1].sum()) == 1 + len(tokenizer("Tom")["input_ids"]) + 1
    assert not mask[1, -1] and tokens[1, -1] == tokenizer.eos_token_id
    short, short_mask = bilingual.tokenize_documents(tokenizer, ["Anna plant das Projekt heute."], 4)
    assert short.shape == (1, 4) and short_mask.all()


def test_the_toy_recipe_rejects_an_unknown_activation_before_any_training():
    from helpers.models.recipes.bilingual import Recipe

    assert Recipe().activation == "relu" and Recipe(activation="gelu").activation == "gelu"
    with pytest.raises(ValueError, match="activation"):
        Recipe(activation="rleu")
