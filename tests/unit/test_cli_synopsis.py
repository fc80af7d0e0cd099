"""The docs' command synopses against the parser: each synopsis lists exactly the flags ``diffguard COMMAND --help``
has, so the docs cannot drift from the CLI again (issue 27: docs/SCANS.md lacked ``--shard-rows``)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from pipeline.cli import build_parser

DOCS = Path(__file__).resolve().parents[2] / "docs"
CHECKER_OPTIONS = "[checker options]"  # a synopsis's stand-in for the flags of pipeline.cli.options.add_checker_options
FLAG = re.compile(r"(?<![\w-])(--?[a-z][a-z0-9-]*)")


def synopses() -> dict[str, tuple[str, str]]:
    """Command -> (its synopsis, the doc it is in): the ``diffguard COMMAND ...`` lines of the docs' plain code blocks,
    with their indented continuation lines. A command has one synopsis across the docs."""
    found: dict[str, tuple[str, str]] = {}
    for doc in sorted(DOCS.glob("*.md")):
        for block in re.findall(r"^```\n(.*?)^```", doc.read_text(), flags=re.M | re.S):
            for entry in re.findall(r"^diffguard [a-z-]+.*(?:\n {2,}\S.*)*", block, flags=re.M):
                command = entry.split()[1]
                assert command not in found, (
                    f"two synopses of `diffguard {command}`: {found[command][1]} and {doc.name}"
                )
                found[command] = (entry, doc.name)
    return found


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> list[tuple[str, ...]]:
    """The parser's options as --help lists them, each with all its spellings (``-n``, ``--num-images``)."""
    return [tuple(a.option_strings) for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS][1:]


def checker_flags() -> set[str]:
    from pipeline.cli.options import add_checker_options

    parser = argparse.ArgumentParser()
    add_checker_options(parser)
    return {flag for spellings in options(parser) for flag in spellings}


DOCUMENTED = synopses()


def test_the_synopses_cover_the_commands_people_type():
    assert {"scan", "scan-results", "check", "generate", "serve", "evaluate", "calibrate", "review"} <= set(DOCUMENTED)
    assert DOCUMENTED["scan"][1] == "SCANS.md"  # the scan's one synopsis; docs/CLI.md links to it


@pytest.mark.parametrize("command", sorted(DOCUMENTED))
def test_a_synopsis_lists_exactly_the_flags_of_help(command):
    synopsis, doc = DOCUMENTED[command]
    parser = subparsers()[command]
    listed = set(FLAG.findall(synopsis.replace(CHECKER_OPTIONS, "")))
    if CHECKER_OPTIONS in synopsis:
        listed |= checker_flags()
    flags = options(parser)
    missing = [spellings[-1] for spellings in flags if not listed & set(spellings)]
    unknown = sorted(listed - {flag for spellings in flags for flag in spellings})
    assert not missing and not unknown, (
        f"docs/{doc}'s synopsis of `diffguard {command}` lacks {missing} and names {unknown}, "
        f"which `diffguard {command} --help` does not have"
    )


def test_the_flag_pattern_reads_a_synopsis_as_written():
    synopsis = "diffguard x PATH... [-n N] [--max-pixels N] [--quarantine PREFIX | --tag] [--width W --height H]"
    assert FLAG.findall(synopsis) == ["-n", "--max-pixels", "--quarantine", "--tag", "--width", "--height"]
