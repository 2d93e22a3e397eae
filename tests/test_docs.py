"""The documentation site: it builds strictly, its API pages hold the generated functions
and classes, every page is in the nav, and the README's links lead somewhere."""

from __future__ import annotations

import html
import os
import pathlib
import re
import subprocess
import sys

import pytest

import mvn_core

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _mkdocs():
    return pytest.importorskip(
        "mkdocs", reason="mkdocs is not installed: the site is not built (pip install "
                         "'mvn-core[docs]')")


def _build(config, site, package, check=True):
    """mkdocs build --strict of ``config``, importing mvn_core from ``package``."""
    env = dict(os.environ, MVN_CORE_DOCS_PACKAGE=str(package), NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "--config-file", str(config), "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if check:
        assert done.returncode == 0, f"the strict build failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A regular install of this checkout (the package-dir mapping as pip lays it out),
    which mkdocstrings imports."""
    _mkdocs()
    target = tmp_path_factory.mktemp("package")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    assert (target / "mvn_core" / "adapters" / "torch.py").is_file()
    return target


@pytest.fixture(scope="module")
def site(package, tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    _build(ROOT / "mkdocs.yml", site, package)
    return site


def _text(page):
    """A built page's text, without its tags."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", page.read_text())).split())


def _first_sentence(doc):
    return " ".join(re.sub(r"``?", "", doc.split("\n")[0]).split(".  ")[0].split(". ")[0].split())


def test_the_api_page_holds_every_rules_functions_with_their_docstrings(site):
    text = _text(site / "api" / "core" / "index.html")
    for name in ("apply_updates", "skip_if_nonfinite", "all_finite"):
        assert name in text
    for rule in mvn_core.rules.values():
        for function in (rule.init, rule.update):
            assert function.__name__ in text, function.__name__
        assert _first_sentence(rule.doc) in text, rule.name
        assert rule.state_type.__name__ in text


def test_the_rule_api_page_holds_define_rule_and_the_registry(site):
    text = _text(site / "api" / "rule" / "index.html")
    assert "define_rule" in text and "Hyperparameter" in text
    assert "Declare a rule; returns its" in text  # define_rule's docstring
    assert "The registry of rules" in text        # mvn_core.registry's


@pytest.mark.parametrize("adapter, names", [
    ("torch", ["optimizer_class", "RuleOptimizer"]),
    ("optax", ["transformation", "scale_by", "scale_by_mvn"]),
    ("keras", ["optimizer_class", "RuleOptimizer"]),
    ("arrays", ["optimizer_class", "ArrayOptimizer"]),
])
def test_the_adapter_pages_hold_the_generated_optimizers(site, adapter, names):
    text = _text(site / "api" / adapter / "index.html")
    for name in names:
        assert name in text, name
    for rule in mvn_core.rules.values():
        if rule.kind != "optimizer":
            continue
        generated = rule.function_name if adapter == "optax" else rule.class_name
        assert re.search(rf"\b{re.escape(generated)}\b", text), (adapter, generated)
        assert _first_sentence(rule.doc) in text, (adapter, rule.name)  # from its docstring


def test_the_torch_page_documents_mvngrad_as_a_class(site):
    page = (site / "api" / "torch" / "index.html").read_text()
    assert 'id="mvn_core.adapters.torch.MVNGrad"' in page
    title = mvn_core.rules["mvn"].title
    assert f"{title} as a torch.optim.Optimizer" in _text(site / "api" / "torch" / "index.html")


def test_every_page_is_built(site):
    for page in DOCS.rglob("*.md"):
        relative = page.relative_to(DOCS).with_suffix("")
        built = site / ("index.html" if relative.name == "index" else relative / "index.html")
        assert built.is_file(), page


@pytest.mark.parametrize("page, fault", [
    ("[a page that is not there](missing.md)", "a broken link"),
    ("[a heading that is not there](#nowhere)", "a broken anchor"),
    ("::: mvn_core_has_no_such_module", "an API object that cannot be found"),
    (None, "a page missing from the nav"),
])
def test_the_strict_build_fails_on(package, tmp_path, page, fault):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(f"# Home\n\n{page or 'Nothing wrong here.'}\n")
    if page is None:
        (docs / "orphan.md").write_text("# Not in the nav\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: {docs}\nnav:\n  - index.md\n")
    done = _build(config, tmp_path / "site", package, check=False)
    assert done.returncode != 0, f"{fault} did not fail the build"


def _nav_files(nav):
    for item in nav:
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for value in item.values():
                yield from ([value] if isinstance(value, str) else _nav_files(value))


def test_every_page_in_docs_is_in_the_nav():
    from mkdocs.config import load_config

    _mkdocs()
    nav = list(_nav_files(load_config(str(ROOT / "mkdocs.yml")).nav))
    assert len(nav) == len(set(nav)), "a page is twice in the nav"
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages == set(nav), (f"not in the nav: {sorted(pages - set(nav))}; "
                               f"in the nav, no such page: {sorted(set(nav) - pages)}")


def _slug(heading):
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def _anchors(markdown):
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", markdown, flags=re.M)}


def test_the_readme_links_lead_to_files_and_headings():
    readme = (ROOT / "README.md").read_text()
    links = [link for link in LINK.findall(readme) if not re.match(r"[a-z]+:", link)]
    assert len(links) >= 20
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        assert target.is_file(), f"README links to {link}: no such file"
        if anchor:
            assert anchor in _anchors(target.read_text()), f"README links to {link}: no such heading"


def test_the_readme_links_to_every_page():
    readme = (ROOT / "README.md").read_text()
    linked = {link.partition("#")[0] for link in LINK.findall(readme)}
    for page in DOCS.rglob("*.md"):
        assert page.relative_to(ROOT).as_posix() in linked, page


def test_the_readme_opens_with_its_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == ""
    block = lines[2:lines.index("```", 3) + 1]
    assert block[0] == "```sh"
    commands = [line.split("#")[0].strip() for line in block[1:-1]]
    assert commands == ["make demo", "make test"]
    section = lines[lines.index("## Adding a rule"):]
    section = "\n".join(section[:section.index("## Speed")])
    for link in ("(docs/adding-a-rule.md)", "(examples/custom_rule.py)"):
        assert link in section


def test_the_rules_page_lists_every_registered_rule(site):
    """Its table is generated from the registry at build time (mkdocs_hooks.py)."""
    text = _text(site / "rules" / "index.html")
    assert "the rules table" not in text  # the marker was replaced
    for rule in mvn_core.rules.values():
        assert rule.update.__name__ in text and rule.reference in text, rule.name
