"""The documentation site's sources (issue 32): the README stays a short start page, the nav and the API pages
name what exists, the CLI reference is generated from the parser, the tutorial is committed without outputs.

The strict site build itself (`mkdocs build --strict`, which needs the docs extra) runs in .ci/docs_check.sh."""

import importlib
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from laperm.cli import build_parser

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
README_LIMIT = 10_000


def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!ENV", lambda loader, node: loader.construct_sequence(node)[-1])  # the default
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_readme_is_under_10k_characters_and_keeps_the_two_fresh_machine_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text) < README_LIMIT, f"README.md has {len(text):,} characters: move a section to a docs/ page"
    assert (
        "python3.11 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e . && .venv/bin/laperm train" in text
    )
    test_command = (
        "python3.11 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[dev,integrations]' "
        "&& .venv/bin/python -m pytest"
    )
    assert test_command in text and test_command in (ROOT / ".ci" / "run").read_text()
    assert "mkdocs serve" in text and "mkdocs build --strict" in text  # how to build and serve the site


def test_every_relative_link_of_the_readme_names_a_file():
    text = (ROOT / "README.md").read_text()
    links = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http", "#"))]
    assert links and [t for t in links if not (ROOT / t).is_file()] == []


def test_the_nav_names_only_pages_that_exist():
    config = mkdocs_config()
    assert config["docs_dir"] == "docs" and config["strict"] is True
    pages = nav_pages(config["nav"])
    generated = {hooks().CLI_PAGE}
    assert "cli.md" in pages and "results.md" in pages and "tutorial.ipynb" in pages
    assert [p for p in pages if p not in generated and not (DOCS / p).is_file()] == []
    # a docs page left out of the nav is built and link-checked, only not listed; a broken link still fails
    assert config["validation"]["nav"]["omitted_files"] == "info"
    assert config["validation"]["links"]["not_found"] == "warn"


def test_the_api_pages_name_objects_that_exist():
    names = [m for page in (DOCS / "api").glob("*.md") for m in re.findall(r"(?m)^::: ([\w.]+)$", page.read_text())]
    assert "laperm.LaPerm" in names and "laperm.laperm_param_groups" in names
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            target = importlib.import_module(name)
        except ModuleNotFoundError:
            target = getattr(importlib.import_module(module), attr)
        assert target is not None, name


def test_the_cli_reference_has_every_subcommand_and_flag_of_the_parser():
    parser = build_parser()
    page = hooks().render_cli_reference()
    commands = hooks().subcommands(parser)
    assert {"train", "verify", "export", "pack", "run", "report"} <= set(commands)
    assert re.findall(r"(?m)^## `laperm (\w+)`$", page) == list(commands)
    for sub in commands.values():
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in page, flag
    assert "--version" in page


def test_the_cli_reference_follows_a_new_subcommand():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    sub.add_parser("brand-new", help="added after the docs were written").add_argument("--shiny")
    assert "brand-new" in hooks().subcommands(parser)


def test_links_out_of_docs_are_mapped_to_repository_files():
    found = hooks().outside_links(
        "[a](../examples/drop_in.py) [b](../examples/missing.py) [c](loop.md) [d](../../src/laperm/cli.py#L3)",
        "",
    )
    assert found == {"../examples/drop_in.py": "examples/drop_in.py"}
    assert hooks().outside_links("[d](../../src/laperm/cli.py)", "api") == {
        "../../src/laperm/cli.py": "src/laperm/cli.py"
    }


def test_the_tutorial_is_committed_without_outputs_and_covers_the_tour():
    nb = json.loads((DOCS / "tutorial.ipynb").read_text())
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    source = "\n".join("".join(c["source"]) for c in code)
    for needed in ("LaPerm(", "torch.optim.Adam(baseline", ".verify()", "profile_quantiles", "save_compact"):
        assert needed in source, needed


@pytest.mark.parametrize(
    "page, content",
    [
        ("index.md", "verified: 266,200 permuted weights"),  # the main job's whole output
        ("loop.md", 'sync_rule="latent"'),
        ("stacking.md", "laperm train --preset conv2 --seeds 0-7"),
        ("distributed.md", "torchrun --standalone --nproc-per-node 2 -m laperm train"),
        ("transformers.md", "laperm train --preset char-gpt"),
        ("reliability.md", "laperm unpack pack --into work"),
        ("commands.md", "laperm export runs/<name> --check"),
    ],
)
def test_the_sections_moved_out_of_the_readme_kept_their_content(page, content):
    assert content in (DOCS / page).read_text()
