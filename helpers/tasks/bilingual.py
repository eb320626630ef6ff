"""Bilingual (German / English) documents: a deterministic generator, and a loader for real text.

The generator writes one-language documents of a few hundred characters from one shared "meaning" grammar, so the
two languages talk about the same things (no domain confound, unlike the original notebook's KDE-docs vs.
parliament-news pair). It is built so that knowing the document's language pays off for next-token prediction at many
positions:

- language-specific function words and word order (German V2 inversion, verb-final subordinate clauses);
- many long German words (compounds such as `Vorschläge`, `Haushaltsplan`, `Zusammenarbeit`) that a small BPE
  splits into several tokens, the raw material of contextual n-grams;
- sub-word prefixes shared by both languages whose continuation depends on the language (`find|et` / `find|s`,
  `organis|iert` / `organis|es`, `perf|ekt` / `perf|ect`, `Proj|ekt` / `Proj|ect`);
- many language-neutral tokens (names, cities, numbers) so that the language must be carried from context.

`load_text_documents` reads real text (a local file with one document per line, or a Hugging Face dataset for users
with network), for running the notebook on natural German and English as the original notebook did.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from helpers.sources import realdata

if TYPE_CHECKING:  # the module leaves torch unimported until a function needs it
    from jaxtyping import Bool, Int
    from torch import Tensor

LANGUAGES = ("en", "de")

# (english singular, english plural, german singular, german plural, german gender m/f/n)
NOUNS: list[tuple[str, str, str, str, str]] = [
    ("proposal", "proposals", "Vorschlag", "Vorschläge", "m"),
    ("project", "projects", "Projekt", "Projekte", "n"),
    ("problem", "problems", "Problem", "Probleme", "n"),
    ("system", "systems", "System", "Systeme", "n"),
    ("program", "programs", "Programm", "Programme", "n"),
    ("process", "processes", "Prozess", "Prozesse", "m"),
    ("method", "methods", "Methode", "Methoden", "f"),
    ("theory", "theories", "Theorie", "Theorien", "f"),
    ("family", "families", "Familie", "Familien", "f"),
    ("garden", "gardens", "Garten", "Gärten", "m"),
    ("house", "houses", "Haus", "Häuser", "n"),
    ("book", "books", "Buch", "Bücher", "n"),
    ("concert", "concerts", "Konzert", "Konzerte", "n"),
    ("budget", "budgets", "Haushaltsplan", "Haushaltspläne", "m"),
    ("decision", "decisions", "Entscheidung", "Entscheidungen", "f"),
    ("improvement", "improvements", "Verbesserung", "Verbesserungen", "f"),
    ("responsibility", "responsibilities", "Verantwortung", "Verantwortungen", "f"),
    ("cooperation", "cooperations", "Zusammenarbeit", "Zusammenarbeiten", "f"),
    ("community", "communities", "Gemeinschaft", "Gemeinschaften", "f"),
    ("government", "governments", "Bundesregierung", "Bundesregierungen", "f"),
    ("working group", "working groups", "Arbeitsgruppe", "Arbeitsgruppen", "f"),
    ("agenda", "agendas", "Tagesordnung", "Tagesordnungen", "f"),
    ("management", "managements", "Geschäftsleitung", "Geschäftsleitungen", "f"),
    ("meeting", "meetings", "Besprechung", "Besprechungen", "f"),
    ("customer", "customers", "Kunde", "Kunden", "m"),
    ("teacher", "teachers", "Lehrerin", "Lehrerinnen", "f"),
    ("pupil", "pupils", "Schüler", "Schüler", "m"),
    ("company", "companies", "Firma", "Firmen", "f"),
    ("computer", "computers", "Computer", "Computer", "m"),
    ("hotel", "hotels", "Hotel", "Hotels", "n"),
    ("document", "documents", "Dokument", "Dokumente", "n"),
    ("report", "reports", "Bericht", "Berichte", "m"),
    ("question", "questions", "Frage", "Fragen", "f"),
    ("answer", "answers", "Antwort", "Antworten", "f"),
    ("city", "cities", "Stadt", "Städte", "f"),
    ("school", "schools", "Schule", "Schulen", "f"),
    ("university", "universities", "Universität", "Universitäten", "f"),
    ("car", "cars", "Auto", "Autos", "n"),
    ("train", "trains", "Zug", "Züge", "m"),
    ("letter", "letters", "Brief", "Briefe", "m"),
    ("idea", "ideas", "Idee", "Ideen", "f"),
    ("plan", "plans", "Plan", "Pläne", "m"),
    ("network", "networks", "Netzwerk", "Netzwerke", "n"),
    ("solution", "solutions", "Lösung", "Lösungen", "f"),
    ("traffic problem", "traffic problems", "Verkehrsproblem", "Verkehrsprobleme", "n"),
    ("holiday", "holidays", "Urlaub", "Urlaube", "m"),
    ("museum", "museums", "Museum", "Museen", "n"),
    ("restaurant", "restaurants", "Restaurant", "Restaurants", "n"),
    ("experiment", "experiments", "Experiment", "Experimente", "n"),
    ("product", "products", "Produkt", "Produkte", "n"),
    ("contract", "contracts", "Vertrag", "Verträge", "m"),
    ("research", "research projects", "Forschung", "Forschungsprojekte", "f"),
    ("economic policy", "economic policies", "Wirtschaftspolitik", "Wirtschaftspolitiken", "f"),
    ("environmental protection", "environmental laws", "Umweltschutz", "Umweltgesetze", "m"),
    ("friendship", "friendships", "Freundschaft", "Freundschaften", "f"),
    ("development", "developments", "Entwicklung", "Entwicklungen", "f"),
]

# (english 3rd singular, english base, german 3rd singular, german infinitive / plural). Many share a stem.
VERBS: list[tuple[str, str, str, str]] = [
    ("plans", "plan", "plant", "planen"),
    ("finds", "find", "findet", "finden"),
    ("brings", "bring", "bringt", "bringen"),
    ("sends", "send", "sendet", "senden"),
    ("starts", "start", "startet", "starten"),
    ("tests", "test", "testet", "testen"),
    ("organises", "organise", "organisiert", "organisieren"),
    ("analyses", "analyse", "analysiert", "analysieren"),
    ("discusses", "discuss", "diskutiert", "diskutieren"),
    ("produces", "produce", "produziert", "produzieren"),
    ("reduces", "reduce", "reduziert", "reduzieren"),
    ("controls", "control", "kontrolliert", "kontrollieren"),
    ("presents", "present", "präsentiert", "präsentieren"),
    ("improves", "improve", "verbessert", "verbessern"),
    ("supports", "support", "unterstützt", "unterstützen"),
    ("needs", "need", "braucht", "brauchen"),
    ("buys", "buy", "kauft", "kaufen"),
    ("sells", "sell", "verkauft", "verkaufen"),
    ("writes", "write", "schreibt", "schreiben"),
    ("builds", "build", "baut", "bauen"),
    ("repairs", "repair", "repariert", "reparieren"),
    ("installs", "install", "installiert", "installieren"),
    ("checks", "check", "prüft", "prüfen"),
    ("finances", "finance", "finanziert", "finanzieren"),
    ("accepts", "accept", "akzeptiert", "akzeptieren"),
    ("ignores", "ignore", "ignoriert", "ignorieren"),
    ("publishes", "publish", "veröffentlicht", "veröffentlichen"),
    ("describes", "describe", "beschreibt", "beschreiben"),
    ("explains", "explain", "erklärt", "erklären"),
    ("loves", "love", "liebt", "lieben"),
    ("learns", "learn", "lernt", "lernen"),
    ("markets", "market", "vermarktet", "vermarkten"),
    ("reforms", "reform", "reformiert", "reformieren"),
    ("informs", "inform", "informiert", "informieren"),
]

# (english, german); many share a prefix whose ending differs by language.
ADJECTIVES: list[tuple[str, str]] = [
    ("new", "neu"), ("modern", "modern"), ("interesting", "interessant"), ("perfect", "perfekt"),
    ("direct", "direkt"), ("active", "aktiv"), ("creative", "kreativ"), ("positive", "positiv"),
    ("negative", "negativ"), ("effective", "effektiv"), ("social", "sozial"), ("official", "offiziell"),
    ("financial", "finanziell"), ("international", "international"), ("important", "wichtig"),
    ("big", "groß"), ("small", "klein"), ("good", "gut"), ("concrete", "konkret"), ("complete", "komplett"),
    ("elegant", "elegant"), ("normal", "normal"), ("ideal", "ideal"), ("practical", "praktisch"),
    ("political", "politisch"), ("economic", "wirtschaftlich"), ("joint", "gemeinsam"), ("imposing", "imposant"),
    ("expensive", "teuer"), ("difficult", "schwierig"), ("sustainable", "nachhaltig"), ("special", "speziell"),
]

NAMES = ["Anna", "Tom", "Maria", "Paul", "Lisa", "Max", "Emma", "Felix", "Laura", "David", "Sophie", "Jonas",
         "Alice", "Bob", "Clara", "Simon", "Nina", "Lukas", "Eva", "Martin"]
# (english, german) — most cities are spelt alike.
CITIES = [("Berlin", "Berlin"), ("Paris", "Paris"), ("London", "London"), ("Hamburg", "Hamburg"),
          ("Frankfurt", "Frankfurt"), ("Prague", "Prag"), ("Vienna", "Wien"), ("Munich", "München"),
          ("Zurich", "Zürich"), ("Rome", "Rom"), ("Madrid", "Madrid"), ("Oslo", "Oslo"), ("Dresden", "Dresden"),
          ("Bremen", "Bremen"), ("Boston", "Boston"), ("Chicago", "Chicago")]
TIMES = [("today", "heute"), ("tomorrow", "morgen"), ("now", "jetzt"), ("often", "oft"), ("again", "wieder"),
         ("finally", "endlich"), ("next week", "nächste Woche"), ("in the evening", "am Abend"),
         ("on Monday", "am Montag"), ("in 2024", "im Jahr 2024")]
REASONS = [("because", "weil"), ("although", "obwohl"), ("when", "wenn")]
SAY_VERBS = [("says", "sagt"), ("thinks", "denkt"), ("knows", "weiß"), ("writes", "schreibt"), ("hopes", "hofft")]

_DEF = {"m": ("der", "den"), "f": ("die", "die"), "n": ("das", "das")}   # nominative, accusative
_INDEF = {"m": ("ein", "einen"), "f": ("eine", "eine"), "n": ("ein", "ein")}


@dataclass(frozen=True)
class Document:
    """One generated document: its text and language (`"en"` or `"de"`)."""

    text: str
    language: str


class _Writer:
    """Renders one shared sentence meaning in English or German."""

    def __init__(self, rng: random.Random, language: str, nouns: Sequence[int], names: Sequence[str],
                 code_switch: float = 0.0):
        self.rng, self.de = rng, language == "de"
        self.nouns, self.names = list(nouns), list(names)
        self.code_switch = code_switch

    # --- noun phrases -------------------------------------------------------------------------------------------
    def noun_phrase(self, case: int, *, allow_name: bool = True, plural_ok: bool = True) -> tuple[str, bool]:
        """(phrase, is_plural); case 0 = nominative, 1 = accusative. With probability `code_switch` the phrase is
        written in the other language (a quoted foreign phrase), so that no single word reliably gives the
        document's language away."""
        if self.code_switch and self.rng.random() < self.code_switch:
            self.de = not self.de
            try:
                return self._noun_phrase(case, allow_name=False, plural_ok=plural_ok)
            finally:
                self.de = not self.de
        return self._noun_phrase(case, allow_name=allow_name, plural_ok=plural_ok)

    def _noun_phrase(self, case: int, *, allow_name: bool = True, plural_ok: bool = True) -> tuple[str, bool]:
        rng = self.rng
        if allow_name and rng.random() < 0.35:
            return rng.choice(self.names), False
        en_sg, en_pl, de_sg, de_pl, gender = NOUNS[rng.choice(self.nouns)]
        plural = plural_ok and rng.random() < 0.25
        adjective = ADJECTIVES[rng.randrange(len(ADJECTIVES))] if rng.random() < 0.4 else None
        kind = rng.random()
        if plural:
            number = str(rng.randint(2, 99)) if kind < 0.4 else None
            if self.de:
                det = number if number else ("die" if kind < 0.8 else "viele")
                adj = (adjective[1] + ("e" if number or det == "viele" else "en")) if adjective else None
                return " ".join(w for w in (det, adj, de_pl) if w), True
            det = number if number else ("the" if kind < 0.8 else "many")
            return " ".join(w for w in (det, adjective[0] if adjective else None, en_pl) if w), True
        definite = kind < 0.65
        if self.de:
            det = (_DEF if definite else _INDEF)[gender][case]
            if adjective:
                if definite:
                    ending = "en" if (case == 1 and gender == "m") else "e"
                else:
                    ending = {"m": ("er", "en"), "f": ("e", "e"), "n": ("es", "es")}[gender][case]
                return f"{det} {adjective[1]}{ending} {de_sg}", False
            return f"{det} {de_sg}", False
        det = "the" if definite else ("an" if (adjective[0] if adjective else en_sg)[0] in "aeiou" else "a")
        return " ".join(w for w in (det, adjective[0] if adjective else None, en_sg) if w), False

    def verb(self, plural: bool) -> tuple[str, str]:
        """(finite form, infinitive) in the document's language."""
        en3, en_base, de3, de_inf = self.rng.choice(VERBS)
        if self.de:
            return (de_inf if plural else de3), de_inf
        return (en_base if plural else en3), en_base

    # --- sentences ----------------------------------------------------------------------------------------------
    def sentence(self) -> str:
        rng, de = self.rng, self.de
        kind = rng.randrange(8)
        subject, plural = self.noun_phrase(0)
        finite, infinitive = self.verb(plural)
        obj, _ = self.noun_phrase(1)
        if kind == 0:  # S V O.
            s = f"{subject} {finite} {obj}"
        elif kind == 1:  # Time S V O (German: V2 inversion)
            en_t, de_t = rng.choice(TIMES)
            s = f"{de_t} {finite} {subject} {obj}" if de else f"{en_t} {subject} {finite} {obj}"
        elif kind == 2:  # S says that S2 V O (German: verb-final)
            speaker = rng.choice(self.names)
            en_say, de_say = rng.choice(SAY_VERBS)
            s = (f"{speaker} {de_say}, dass {subject} {obj} {finite}" if de
                 else f"{speaker} {en_say} that {subject} {finite} {obj}")
        elif kind == 3:  # S is ADJ
            en_a, de_a = rng.choice(ADJECTIVES)
            s = f"{subject} {'sind' if plural else 'ist'} {de_a}" if de else f"{subject} {'are' if plural else 'is'} {en_a}"
        elif kind == 4:  # A and B V O together
            first, other = rng.sample(self.names, 2)
            finite_pl, _ = self.verb(True)
            s = (f"{first} und {other} {finite_pl} {obj} gemeinsam" if de
                 else f"{first} and {other} {finite_pl} {obj} together")
        elif kind == 5:  # S does not V O, because S2 V2 O2 (German: verb-final after weil)
            en_r, de_r = rng.choice(REASONS)
            subject2, plural2 = self.noun_phrase(0)
            finite2, _ = self.verb(plural2)
            obj2, _ = self.noun_phrase(1)
            if de:
                s = f"{subject} {finite} {obj} nicht, {de_r} {subject2} {obj2} {finite2}"
            else:
                aux = "do" if plural else "does"
                s = f"{subject} {aux} not {infinitive} {obj} {en_r} {subject2} {finite2} {obj2}"
        elif kind == 6:  # in CITY, S V O
            en_c, de_c = rng.choice(CITIES)
            s = f"In {de_c} {finite} {subject} {obj}" if de else f"In {en_c}, {subject} {finite} {obj}"
        else:  # We want to V O / Wir wollen O V
            obj2, _ = self.noun_phrase(1, allow_name=False)
            s = f"Wir wollen {obj2} {infinitive}" if de else f"We want to {infinitive} {obj2}"
        s = s[0].upper() + s[1:]
        return s + ("?" if kind == 0 and rng.random() < 0.1 else ".")


def generate_document(rng: random.Random, language: str, min_chars: int = 300, max_chars: int = 700,
                      code_switch: float = 0.0) -> Document:
    """One document of `min_chars`..`max_chars` characters (whole sentences) about a few recurring things.

    `code_switch` is the probability that a noun phrase is written in the other language.
    """
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    nouns = rng.sample(range(len(NOUNS)), k=8)
    names = rng.sample(NAMES, k=3)
    writer = _Writer(rng, language, nouns, names, code_switch)
    target = rng.randint(min_chars, max_chars)
    sentences: list[str] = []
    length = 0
    while length < target:
        sentence = writer.sentence()
        if length + len(sentence) + 1 > max_chars and length >= min_chars:
            break
        sentences.append(sentence)
        length += len(sentence) + 1
    return Document(" ".join(sentences), language)


def generate_corpus(n_documents: int, *, german_fraction: float = 0.5, seed: int = 0, min_chars: int = 300,
                    max_chars: int = 700, code_switch: float = 0.0) -> list[Document]:
    """`n_documents` documents, each German with probability `german_fraction`; a pure function of its arguments."""
    if not 0.0 <= german_fraction <= 1.0:
        raise ValueError(f"german_fraction must be in [0, 1], got {german_fraction}")
    if not 0.0 <= code_switch < 0.5:
        raise ValueError(f"code_switch must be in [0, 0.5), got {code_switch}")
    rng = random.Random(seed)
    return [generate_document(rng, "de" if rng.random() < german_fraction else "en", min_chars, max_chars,
                              code_switch) for _ in range(n_documents)]


def evaluation_texts(n_per_language: int, *, seed: int = 12345, min_chars: int = 300,
                     max_chars: int = 700, code_switch: float = 0.0) -> tuple[list[str], list[str]]:
    """Held-out `(german, english)` texts, `n_per_language` each, from a seed the toy's training never uses."""
    rng = random.Random(seed)
    german = [generate_document(rng, "de", min_chars, max_chars, code_switch).text for _ in range(n_per_language)]
    english = [generate_document(rng, "en", min_chars, max_chars, code_switch).text for _ in range(n_per_language)]
    return german, english


def tokenize_documents(tokenizer, texts: Sequence[str], n_ctx: int, *, append_eos: bool = True,
                       prepend_bos: bool = True) -> tuple[Int[Tensor, "n n_ctx"], Bool[Tensor, "n n_ctx"]]:
    """`(tokens [n, n_ctx], mask [n, n_ctx])`: BOS (when `prepend_bos`) + each document's tokens (+ EOS), cut at
    `n_ctx`, padded with EOS; `mask` is True on real tokens. Works with any Hugging Face tokenizer (Pythia's BOS is
    its `<|endoftext|>`)."""
    import torch

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    tokens = torch.full((len(texts), n_ctx), eos, dtype=torch.long)
    mask = torch.zeros((len(texts), n_ctx), dtype=torch.bool)
    for row, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
        ids = ([bos] * prepend_bos + list(ids) + ([eos] if append_eos else []))[:n_ctx]
        tokens[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = True
    return tokens, mask


# ---------------------------------------------------------------------------------------------------------------
# Real text
# ---------------------------------------------------------------------------------------------------------------

def load_text_documents(source: str | Path, *, n_documents: int | None = None, min_chars: int = 300,
                        max_chars: int = 2000, split: str = "train", column: str | None = None,
                        config: str | None = None, language: str | None = None) -> list[str]:
    """Real documents for running the notebook on natural text.

    `source` is the name of a text that ships in a registry package (`helpers.sources.realdata.TEXTS`:
    `"debian-reference-de"`, `"debian-reference-en"`; fetched on first use), a local text file with one document per
    line (the original notebook's `kde4_english.txt` / `wmt_german_large.txt` format), or a Hugging Face dataset id (needs network and the `datasets` package), e.g.
    `load_text_documents("kde4", config="de-en", language="de")` for a parallel corpus whose rows hold a
    `translation` dict, or `load_text_documents("wikipedia", config="20220301.de", column="text")`.

    Consecutive short lines (sentences) are joined until a document reaches `min_chars`; documents are cut at
    `max_chars` (on a word boundary). Returns at most `n_documents` documents, in source order.
    """
    path = Path(source)
    if str(source) in realdata.TEXTS:
        path = realdata.fetch_text(str(source))
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
    else:
        try:
            from datasets import load_dataset
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("loading a hub data set needs the `datasets` package") from error
        dataset = load_dataset(str(source), config, split=split, streaming=True)
        lines = _dataset_lines(dataset, column, language, n_documents, min_chars)
    return _pack(lines, n_documents, min_chars, max_chars)


def _dataset_lines(dataset, column: str | None, language: str | None, n_documents: int | None, min_chars: int):
    budget = None if n_documents is None else n_documents * max(1, min_chars) * 4
    total = 0
    for row in dataset:
        if column is not None:
            value = row[column]
        elif "translation" in row:
            if language is None:
                raise ValueError("a translation data set needs language= (e.g. 'de' or 'en')")
            value = row["translation"][language]
        else:
            value = row["text"]
        value = str(value)
        total += len(value)
        yield value
        if budget is not None and total > budget:
            return


def _pack(lines, n_documents: int | None, min_chars: int, max_chars: int) -> list[str]:
    documents: list[str] = []
    current = ""
    for line in lines:
        line = " ".join(line.split())
        if not line:
            continue
        current = f"{current} {line}" if current else line
        if len(current) >= min_chars:
            if len(current) > max_chars:
                cut = current.rfind(" ", 0, max_chars)
                current = current[: cut if cut > min_chars // 2 else max_chars]
            documents.append(current)
            current = ""
            if n_documents is not None and len(documents) >= n_documents:
                break
    return documents
