"""The plain-text manual is cut into prose paragraphs, one per line; pinned sources name their checksums."""
import pytest

from helpers.sources import realdata

MANUAL = """1.4.9. Aufzeichnen der Shell-Aktivitäten

    Die Ausgabe eines Shell-Befehls könnte aus Ihrem Bildschirm
    herauslaufen und für immer verloren sein. Es ist nützlich,
\xa0\xa0\xa0 Shell-Aktivitäten in einer Datei zu protokollieren, um sie später
    kontrollieren zu können. Diese Art der Aufzeichnung ist besonders
    wichtig für jegliche Systemadministrationsaufgaben.

    Tipp

    $ script
          Script started, file is typescript

    |TERMINAL-JOB   |Strg-W N (oder   |in den TERMINAL-NORMAL-Modus |
    |               |Strg-\\ Strg-N)   |wechseln                     |
"""


def test_paragraphs_keep_prose_joined_on_one_line():
    kept = realdata.paragraphs(MANUAL)
    assert len(kept) == 1
    assert kept[0].startswith("Die Ausgabe eines Shell-Befehls könnte aus Ihrem Bildschirm herauslaufen")
    assert "\n" not in kept[0] and "  " not in kept[0]   # the no-break spaces of the indentation are gone too


def test_short_blocks_code_and_tables_are_left_out():
    kept = realdata.paragraphs(MANUAL, min_chars=4)
    assert "Tipp" in kept and not any("script" in p or "|" in p for p in kept)


def test_every_source_is_pinned_by_version_and_sha256():
    for source in [*realdata.TRAINED_MODELS.values(), *realdata.TEXTS.values()]:
        assert len(source.sha256) == 64 and source.licence
    assert all("==" in source.package for source in realdata.TRAINED_MODELS.values())
    with pytest.raises(KeyError, match="no real text named 'debian-reference-fr'"):
        realdata.text_file("debian-reference-fr")
