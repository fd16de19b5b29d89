"""Workflow templates: the shipped ones, sandboxed rendering, injection-proof cells, the library."""

import json
import time
from pathlib import Path

import pytest

from engine.errors import TemplateError
from engine.templates import RenderLimits, TemplateLibrary, parse_template

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_NODES = {
    "CheckpointLoaderSimple", "CLIPTextEncode", "ConditioningZeroOut", "EmptySD3LatentImage", "EmptyLatentImage",
    "ModelSamplingSD3", "KSampler", "VAEDecode", "VAEDecodeTiled", "SaveImage",
    "LoraLoader", "LoadImage", "ImageScale", "Canny", "VAEEncode", "VAEEncodeForInpaint", "ControlNetLoader",
    "ControlNetApplySD3", "MaskToImage", "ImageToMask",
}
INJECTIONS = [
    'say "hi"',
    "back\\slash\\",
    "two\nlines\r\nand\ttab",
    '"}, "99": {"class_type": "SaveImage", "inputs": {}}, "x": {"a": "',
    "{{ 7 * 7 }}",
    "{% for i in range(3) %}X{% endfor %}",
    "{{ ''.__class__.__mro__ }}",
    "</script>\u2028\u0000",
]


def simple(fields, workflow, **extra):
    schema = {"name": "t", "fields": fields, **extra}
    return parse_template(json.dumps(schema), workflow)


PROMPT = [{"name": "prompt", "type": "text", "required": True, "example": "a cat"}]


@pytest.fixture(scope="module")
def library():
    return TemplateLibrary(ROOT / "templates")


# Shipped templates ------------------------------------------------------------------------------------


def test_shipped_templates_load_and_use_only_known_nodes(library):
    assert library.errors() == {}
    names = library.names()
    assert {"product_shot", "turbo_draft", "poster_large", "article_workflow"} <= set(names)
    for template in library.list():
        rendered = template.render(template.example_values(), defaults={"checkpoint": "sd35_demo_tiny"})
        assert {n["class_type"] for n in rendered.values()} <= ALLOWED_NODES, template.name
        assert any(n["class_type"] == "SaveImage" for n in rendered.values())
        for node in rendered.values():  # every link points at an existing node
            for value in node["inputs"].values():
                if isinstance(value, list):
                    assert value[0] in rendered, (template.name, value)
        assert len(template.content_hash) == 64


def test_shipped_templates_speak_chinese_to_a_chinese_page(library):
    """Every shipped template has Chinese words for its title, description and each field's description."""
    for template in library.list():
        words = template.translations["zh"]
        assert words.title and words.description, template.name
        assert set(words.fields) == {f.name for f in template.fields}, template.name
        assert all(any("\u4e00" <= ch <= "\u9fff" for ch in text)
                   for text in (words.title, words.description, *words.fields.values())), template.name
        assert template.title_in("zh") == words.title and template.title_in("en") == template.title
        assert template.title_in("fr") == template.title  # a language without words: the template's own


def test_translations_fill_in_what_they_have_and_refuse_what_they_cannot_mean():
    fields = [*PROMPT, {"name": "steps", "type": "int", "default": 4, "description": "Sampling steps."}]
    workflow = '{"1": {"class_type": "X", "inputs": {"text": {{ prompt }}, "steps": {{ steps }}}}}'
    template = simple(fields, workflow, title="Draft", translations={"zh": {"fields": {"steps": "采样步数。"}}})
    steps = template.get_field("steps")
    assert template.field_description_in(steps, "zh") == "采样步数。"
    assert template.field_description_in(steps, "en") == "Sampling steps."
    assert template.title_in("zh") == "Draft"  # no Chinese title given: the template's own
    assert template.to_dict()["translations"]["zh"]["fields"] == {"steps": "采样步数。"}

    for translations, words in [
        ({"zh": {"fields": {"stpes": "采样步数。"}}}, "translations.zh.fields names stpes, which is not a declared"),
        ({"Chinese!": {"title": "草图"}}, "is not a language tag"),
        ({"zh": {"titel": "草图"}}, "must be an object of title, description and fields"),
        ({"zh": {"title": 5}}, "every title and description must be text"),
        (["zh"], "translations must be an object of languages"),
    ]:
        with pytest.raises(TemplateError, match=words):
            simple(fields, workflow, translations=translations)


def test_product_shot_defaults(library):
    t = library.get("product_shot")
    wf = t.render({"product_name": "Neon Jacket", "color": "red", "style": "cyberpunk", "seed": 1},
                  defaults={"checkpoint": "sd35_demo_tiny"})
    sampler = next(n for n in wf.values() if n["class_type"] == "KSampler")["inputs"]
    assert (sampler["sampler_name"], sampler["scheduler"], sampler["steps"], sampler["cfg"]) == (
        "euler", "sgm_uniform", 28, 4.5)
    latent = next(n for n in wf.values() if n["class_type"] == "EmptySD3LatentImage")["inputs"]
    assert (latent["width"], latent["height"]) == (1024, 1024)
    texts = [n["inputs"]["text"] for n in wf.values() if n["class_type"] == "CLIPTextEncode"]
    assert "red Neon Jacket" in texts[0] and "cyberpunk style" in texts[0] and "blurry" in texts[1]
    assert wf["1"]["inputs"]["ckpt_name"] == "sd35_demo_tiny"
    assert t.filename_pattern == "{product_name}_{color}"


def test_product_shot_branches_add_and_drop_nodes(library):
    t = library.get("product_shot")
    base = {"product_name": "Boots", "seed": 5}
    plain = t.render(base, defaults={"checkpoint": "m"})
    branched = t.render({**base, "tiled": True, "second_size": 512}, defaults={"checkpoint": "m"})
    assert plain["6"]["class_type"] == "VAEDecode" and "13" not in plain
    assert branched["6"]["class_type"] == "VAEDecodeTiled"
    saves = [n for n in branched.values() if n["class_type"] == "SaveImage"]
    assert len(saves) == 2 and branched["10"]["inputs"]["width"] == 512


def test_turbo_poster_and_article_templates(library):
    turbo = library.get("turbo_draft").render({"prompt": "x", "seed": 1}, {"checkpoint": "m"})
    ks = turbo["5"]["inputs"]
    assert (ks["steps"], ks["cfg"]) == (4, 1.0)
    poster = library.get("poster_large").render({"title": "Sale", "prompt": "beach", "seed": 1}, {"checkpoint": "m"})
    assert any(n["class_type"] == "VAEDecodeTiled" for n in poster.values())
    assert poster["7"]["inputs"]["tile_size"] == 512
    article = library.get("article_workflow")
    assert [f.name for f in article.fields][:2] == ["prompt", "seed"]
    wf = article.render({"prompt": "cyberpunk city", "seed": 12345}, {"checkpoint": "sd3.5_fp8.safetensors"})
    assert wf["3"]["inputs"]["positive"] == wf["3"]["inputs"]["negative"] == ["2", 0]
    assert (wf["3"]["inputs"]["steps"], wf["3"]["inputs"]["cfg"], wf["3"]["inputs"]["scheduler"]) == (30, 7.0, "normal")
    assert wf["4"]["class_type"] == "EmptyLatentImage" and wf["4"]["inputs"]["width"] == 1024
    assert wf["6"]["inputs"]["filename_prefix"] == "SD35_FP8_Batch"


def test_checkpoint_from_row_beats_defaults(library):
    t = library.get("article_workflow")
    wf = t.render({"prompt": "x", "seed": 1, "checkpoint": "sd3.5_large.safetensors"}, {"checkpoint": "demo"})
    assert wf["1"]["inputs"]["ckpt_name"] == "sd3.5_large.safetensors"
    with pytest.raises(TemplateError) as info:
        t.render({"prompt": "x", "seed": 1})
    assert info.value.field == "checkpoint"


def test_seed_up_to_2_64_minus_1_renders_exactly(library):
    wf = library.get("article_workflow").render({"prompt": "x", "seed": 2**64 - 1}, {"checkpoint": "m"})
    assert wf["3"]["inputs"]["seed"] == 2**64 - 1
    with pytest.raises(TemplateError, match="outside"):
        library.get("article_workflow").render({"prompt": "x", "seed": 2**64}, {"checkpoint": "m"})


# Injection and sandbox --------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", INJECTIONS)
def test_cells_land_verbatim_and_cannot_change_the_graph(library, cell):
    t = library.get("article_workflow")
    reference = t.render({"prompt": "plain", "seed": 1}, {"checkpoint": "m"})
    wf = t.render({"prompt": cell, "seed": 1}, {"checkpoint": "m"})
    assert wf["2"]["inputs"]["text"] == cell
    assert set(wf) == set(reference)
    wf["2"]["inputs"]["text"] = "plain"
    assert wf == reference


def test_cells_inside_a_concatenation_are_encoded_once(library):
    t = library.get("product_shot")
    wf = t.render({"product_name": 'A "B"}\n{{x}}', "color": "{% if 1 %}", "seed": 1}, {"checkpoint": "m"})
    assert wf["2"]["inputs"]["text"].startswith('professional product photo of {% if 1 %} A "B"}\n{{x}}')


def test_strict_undefined_names_the_field():
    t = simple(PROMPT + [{"name": "seed", "type": "seed", "example": 1}],
               '{"1": {"class_type": "KSampler", "inputs": {"seed": {{ seed }}, "t": {{ prompt }}}}}')
    with pytest.raises(TemplateError) as info:
        t.render({"prompt": "x"})
    assert info.value.field == "seed" and "seed" in info.value.message


def test_workflow_using_an_undeclared_name_is_refused_at_load():
    with pytest.raises(TemplateError) as info:
        simple(PROMPT, '{"1": {"class_type": "X", "inputs": {"t": {{ prompt ~ colour }}}}}')
    assert info.value.field == "colour"


@pytest.mark.parametrize("expression", [
    "''.__class__.__mro__",
    "prompt.__class__.__base__.__subclasses__()",
    "namespace.__init__.__globals__",
    "range.__globals__",
    "prompt.format.__globals__",
])
def test_sandbox_refuses_attribute_tricks(expression):
    with pytest.raises(TemplateError):
        t = simple(PROMPT, '{"1": {"class_type": "X", "inputs": {"t": {{ ' + expression + ' }}}}}')
        t.render({"prompt": "x"})


@pytest.mark.parametrize("body", [
    '{% for i in range(10**9) %}x{% endfor %}',
    '{{ "x" * 100000000 }}',
    '{{ prompt.ljust(10**9) }}',
    '{{ prompt | center(10**9) }}',
    '{{ "%0999999999d" % 1 }}',
    '{{ "{:>999999999}".format(1) }}',
    '{% for i in range(900) %}{% for j in range(900) %}{{ i }}{% endfor %}{% endfor %}',
    '{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}',
    '{{ (((10 ** 128) ** 128) ** 128) ** 128 }}',  # each exponent small, the number astronomically large
    '{% set n = 10 ** 100 %}{{ n * n * n * n * n * n * n * n * n * n * n * n * n * n * n * n }}',
])
def test_runaway_templates_are_stopped_quickly(body):
    start = time.perf_counter()
    with pytest.raises(TemplateError):
        simple(PROMPT, '{"1": {"class_type": "X", "inputs": {"t": ' + body + '}}}')
    assert time.perf_counter() - start < 5


def test_render_time_budget_stops_silent_loops():
    limits = RenderLimits(max_seconds=0.2)
    schema = json.dumps({"name": "t", "fields": PROMPT})
    body = ('{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}'
            '{% endfor %}{% endfor %}{% endfor %}')
    start = time.perf_counter()
    with pytest.raises(TemplateError, match="longer than"):
        parse_template(schema, '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}' + body, limits=limits)
    assert time.perf_counter() - start < 3


NESTED_LOOPS_OVER_A_LONG_STRING = (
    '{% set s = "x"*1000000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}'
)


def test_uploaded_template_looping_without_output_is_refused_within_the_time_limit(tmp_path):
    """Loops that neither call, range nor output anything still run on the render budget."""
    files = {
        "template.json": json.dumps({"name": "spin", "fields": PROMPT}).encode(),
        "workflow.json.j2": ('{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}'
                             + NESTED_LOOPS_OVER_A_LONG_STRING).encode(),
    }
    library = TemplateLibrary(tmp_path, limits=RenderLimits(max_seconds=0.5))
    start = time.perf_counter()
    with pytest.raises(TemplateError, match=r"longer than 0\.5 s") as info:
        library.add(files)
    assert info.value.details["template"] == "spin" and time.perf_counter() - start < 5
    assert not (tmp_path / "spin").exists()
    (tmp_path / "spin").mkdir()  # the same files placed by hand: listing reports them instead of hanging
    for name, data in files.items():
        (tmp_path / "spin" / name).write_bytes(data)
    start = time.perf_counter()
    assert library.list() == [] and "longer than 0.5 s" in str(library.errors()["spin"])
    assert time.perf_counter() - start < 5


def test_filters_and_tests_applied_per_item_are_on_the_budget():
    """``select`` runs its test once per item, inside one filter call: no loop, call or output between."""
    body = '{% set s = ["x"*100000]*100000 %}{{ s | select("in", "y"*100000) | list | length }}'
    start = time.perf_counter()
    with pytest.raises(TemplateError, match="longer than 0.5 s"):
        parse_template(json.dumps({"name": "t", "fields": PROMPT}),
                       '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}' + body,
                       limits=RenderLimits(max_seconds=0.5))
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("grow", ["ns.s ~ ns.s", "ns.s + ns.s", "ns.s ~ ns.s ~ ns.s"])
def test_values_cannot_double_past_the_size_limit(grow):
    body = ('{% set ns = namespace(s="x"*600000) %}{% for i in range(30) %}{% set ns.s = ' + grow
            + ' %}{% endfor %}')
    with pytest.raises(TemplateError, match="a joined value would be"):
        simple(PROMPT, '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}' + body)


def test_budget_cannot_be_replaced_from_a_template():
    """The budget lives under a key no Jinja name can reach, so a template cannot reset its own clock."""
    body = '{% set _render_budget = none %}{% set render_budget = none %}' + NESTED_LOOPS_OVER_A_LONG_STRING
    with pytest.raises(TemplateError, match="longer than 0.5 s"):
        parse_template(json.dumps({"name": "t", "fields": PROMPT}),
                       '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}' + body,
                       limits=RenderLimits(max_seconds=0.5))


def test_loops_may_add_nodes_per_row():
    fields = PROMPT + [{"name": "copies", "type": "int", "default": 2, "min": 1, "max": 4}]
    t = simple(fields, """{
      "1": {"class_type": "CLIPTextEncode", "inputs": {"text": {{ prompt }}}}
      {% for i in range(copies) %}, {{ "save_" ~ i }}: {"class_type": "SaveImage",
        "inputs": {"images": ["1", 0], "filename_prefix": {{ "copy_" ~ i }}}}{% endfor %}
    }""")
    wf = t.render({"prompt": "x", "copies": 3})
    assert sorted(wf) == ["1", "save_0", "save_1", "save_2"]


# Load-time checks -------------------------------------------------------------------------------------


def test_quoted_placeholder_is_refused_with_a_hint():
    with pytest.raises(TemplateError, match="without quotes"):
        simple(PROMPT, '{"1": {"class_type": "X", "inputs": {"t": "{{ prompt }}"}}}')


def test_template_that_cannot_render_its_examples_is_refused():
    with pytest.raises(TemplateError, match="valid JSON"):
        simple(PROMPT, '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}')
    with pytest.raises(TemplateError, match="object of nodes"):
        simple(PROMPT, '[{{ prompt }}]')


@pytest.mark.parametrize("field, message, code", [
    ({"name": "x", "type": "colour"}, "supported: string", "template_field_type_unknown"),
    ({"name": "range", "type": "string"}, "Jinja name", "template_field_name_invalid"),
    ({"name": "x", "type": "choice"}, "choices", "template_field_choices_missing"),
    ({"name": "x", "type": "int"}, "needs a default", "template_field_default_missing"),
    ({"name": "x", "type": "int", "default": "ten"}, "not a int", "template_field_value_wrong_type"),
    ({"name": "x", "type": "choice", "choices": ["a"], "default": "b"}, "not one of", "template_field_value_refused"),
    ({"name": "x", "type": "int", "default": 5, "max": 3}, "above the maximum", "template_field_value_refused"),
    ({"name": "x", "type": "int", "required": True, "min": 10, "max": 1}, "min 10 is above its max 1",
     "template_field_min_above_max"),
    ({"name": "x", "type": "string", "required": "false"}, "required must be true or false",
     "template_field_required_not_boolean"),
    ({"name": "x", "type": "string", "default": "a", "choices": ["b"]}, "has choices but type 'string'",
     "template_field_choices_unexpected"),
    ({"name": "x", "type": "choice", "choices": ["a", "A"], "default": "a"}, "lists a choice twice: 'a'",
     "template_field_choice_repeated"),
    ({"name": "x", "type": "choice", "choices": ["a", None], "default": "a"}, "text or numbers",
     "template_field_choices_not_text"),
    ({"name": "x", "type": "int", "default": 1, "mini": 0}, "unknown keys: mini", "template_field_unknown_keys"),
    ({"name": "x", "type": "bool", "max": 1}, "cannot have a max", "template_field_bound_not_allowed"),
    ({"name": "x", "type": "int", "default": 1, "min": "0"}, "min must be a number", "template_field_bound_not_number"),
    ("x", "field 2 must be an object", "template_field_not_object"),
])
def test_bad_schemas_are_refused(field, message, code):
    """Each refusal names the field at fault and has its own code, for the page to say it in Chinese."""
    with pytest.raises(TemplateError, match=message) as refused:
        simple(PROMPT + [field], '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}')
    assert refused.value.code == code
    if isinstance(field, dict) and code != "template_field_name_invalid":
        assert refused.value.field == "x"


@pytest.mark.parametrize("pattern", ["{prompt:>10}_{row}", "{prompt.__class__}", "{prompt", "row}"])
def test_filename_pattern_holds_only_plain_placeholders(pattern):
    with pytest.raises(TemplateError, match="only plain"):
        simple(PROMPT, '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}', filename_pattern=pattern)


@pytest.mark.parametrize(("workflow", "message"), [
    ('{% if prompt == "x" %}{% include "other.j2" %}{% endif %}{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}',
     "line 1: include, import and extends are not supported"),
    ('{% import "m.j2" as m %}{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}', "not supported"),
    ('{"1": {"class_type": "X",\n "inputs": {"t": {{ prompt | tojson }}}}}', "line 2: drop '|tojson'"),
])
def test_jinja_that_cannot_work_here_is_refused_at_upload_with_its_line(workflow, message):
    with pytest.raises(TemplateError, match=message):
        simple(PROMPT, workflow)


def test_filename_pattern_must_use_fields():
    with pytest.raises(TemplateError, match="not a field"):
        simple(PROMPT, '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}', filename_pattern="{colour}")
    t = simple(PROMPT, '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}', filename_pattern="{row}_{prompt}")
    assert t.filename_pattern == "{row}_{prompt}"
    # Names are matched as the file names are filled (engine.naming.pattern_values): case-insensitively.
    fields = [{"name": "productName", "type": "string", "required": True}]
    t = simple(fields, '{"1": {"class_type": "X", "inputs": {"t": {{ productName }}}}}',
               filename_pattern="{productName}_{ProductName}_{Row}_{batch_id}")
    assert t.filename_pattern == "{productName}_{ProductName}_{Row}_{batch_id}"


def test_content_hash_changes_with_either_file():
    schema = json.dumps({"name": "t", "fields": PROMPT})
    workflow = '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}'
    a = parse_template(schema, workflow)
    assert parse_template(schema, workflow).content_hash == a.content_hash
    assert parse_template(schema, workflow + " ").content_hash != a.content_hash
    assert parse_template(schema + " ", workflow).content_hash != a.content_hash


def test_coerce_row_converts_text_cells(library):
    values, problems = library.get("product_shot").coerce_row(
        {"product_name": "Boots", "width": "768.0", "tiled": "yes", "seed": "1.5"}, 4)
    assert values["width"] == 768 and values["tiled"] is True and values["color"] == ""
    assert [(p.row, p.column) for p in problems] == [(4, "seed")]


def test_render_converts_text_values_and_refuses_wrong_types(library):
    t = library.get("product_shot")
    wf = t.render({"product_name": "B", "seed": "12345", "width": "512"}, {"checkpoint": "m"})
    assert wf["5"]["inputs"]["seed"] == 12345 and wf["4"]["inputs"]["width"] == 512
    with pytest.raises(TemplateError) as info:
        t.render({"product_name": "B", "seed": 1.5}, {"checkpoint": "m"})
    assert info.value.field == "seed"


# The library ------------------------------------------------------------------------------------------


def test_library_add_validates_before_saving(tmp_path):
    library = TemplateLibrary(tmp_path)
    schema = json.dumps({"name": "mine", "fields": PROMPT}).encode()
    good = b'{"1": {"class_type": "SaveImage", "inputs": {"t": {{ prompt }}}}}'
    with pytest.raises(TemplateError):
        library.add({"template.json": schema, "workflow.json.j2": b'{"1": {{ nope }}}'})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TemplateError, match="unexpected files"):
        library.add({"template.json": schema, "workflow.json.j2": good, "evil.py": b""})
    with pytest.raises(TemplateError, match="PNG"):
        library.add({"template.json": schema, "workflow.json.j2": good, "example.png": b"GIF89a"})
    added = library.add({"template.json": schema, "workflow.json.j2": good})
    assert added.name == "mine" and library.names() == ["mine"]
    with pytest.raises(TemplateError, match="already exists"):
        library.add({"template.json": schema, "workflow.json.j2": good})
    changed = good.replace(b"SaveImage", b"PreviewImage")
    replaced = library.add({"template.json": schema, "workflow.json.j2": changed}, replace=True)
    assert replaced.content_hash != added.content_hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_library_runs_the_engine_validator_on_examples(tmp_path):
    def refuse_unknown_nodes(workflow):
        unknown = {n["class_type"] for n in workflow.values()} - ALLOWED_NODES
        if unknown:
            raise ValueError(f"unknown node types {unknown}")

    library = TemplateLibrary(tmp_path, validate_workflow=refuse_unknown_nodes)
    schema = json.dumps({"name": "odd", "fields": PROMPT}).encode()
    with pytest.raises(TemplateError, match="unknown node types"):
        library.add({"template.json": schema, "workflow.json.j2": b'{"1": {"class_type": "Bogus", "inputs": {"t": {{ prompt }}}}}'})


def test_library_get_unknown_names_the_available_ones(library):
    with pytest.raises(TemplateError, match="available: .*product_shot"):
        library.get("nope")
    with pytest.raises(TemplateError):
        library.get("../templates/product_shot")


def test_library_reports_broken_templates_separately(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "template.json").write_text('{"name": "broken", "fields": []}')
    (tmp_path / "broken" / "workflow.json.j2").write_text("{}")
    library = TemplateLibrary(tmp_path)
    assert library.list() == []
    assert "fields" in library.errors()["broken"].message
    with pytest.raises(TemplateError):
        library.get("broken")


# Jinja blocks, render errors, duplicate keys ----------------------------------------------------------

CELL = 'a "cat"\\nnext\t\\'
FIELDS = PROMPT + [{"name": "color", "type": "string", "default": "red"}]


@pytest.mark.parametrize("workflow", [
    '{% macro describe(p, c) %}{{ p }} in {{ c }}{% endmacro %}'
    '{"1": {"class_type": "X", "inputs": {"t": {{ describe(prompt, color) }}}}}',
    '{% set described %}{{ prompt }} in {{ color }}{% endset %}{"1": {"class_type": "X", "inputs": {"t": {{ described }}}}}',
])
def test_macros_and_set_blocks_build_text_that_is_encoded_once(workflow):
    t = simple(FIELDS, workflow)
    assert t.render({"prompt": CELL, "color": "{{ 7*7 }}"})["1"]["inputs"]["t"] == CELL + " in {{ 7*7 }}"


@pytest.mark.parametrize("workflow", [
    '{"1": {"class_type": "X",\n "inputs": {"t": {% filter upper %}{{ prompt }}{% endfilter %}}}}',
    '{% macro m() %}{{ caller() }}{% endmacro %}{"1": {"class_type": "X",\n '
    '"inputs": {"t": {% call m() %}{{ prompt }}{% endcall %}}}}',
])
def test_filter_and_call_blocks_that_write_into_the_workflow_are_refused_with_their_line(workflow):
    # Their output lands unencoded: upper would turn a cell's newline escape \n into \N, breaking that row's JSON
    with pytest.raises(TemplateError, match=r"line 2: a \{% (filter|call) %\} block is not supported"):
        simple(PROMPT, workflow)
    # Inside a macro they build text, like the rest of its body
    t = simple(PROMPT, '{% macro shout(p) %}{% filter upper %}{{ p }}{% endfilter %}{% endmacro %}'
                       '{"1": {"class_type": "X", "inputs": {"t": {{ shout(prompt) }}}}}')
    assert t.render({"prompt": "a\nb"})["1"]["inputs"]["t"] == "A\nB"


def test_a_set_block_cannot_build_text_past_the_size_limit():
    workflow = ('{% set big = "x" * 900000 %}{% set s %}{% for i in range(1000) %}{{ big }}{% endfor %}{% endset %}'
                '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}, "n": {{ s | length }}}}}')
    started = time.monotonic()
    with pytest.raises(TemplateError, match="block's text would be 900,000,000 long"):
        simple(PROMPT, workflow)
    assert time.monotonic() - started < 1.0


def test_render_errors_name_the_template_and_the_workflow_line():
    with pytest.raises(TemplateError, match=r"template 't' \(workflow.json.j2 line 2\): .*not JSON") as caught:
        simple(PROMPT, '{"1": {"class_type": "X",\n "inputs": {"t": {{ self }}, "p": {{ prompt }}}}}')
    assert caught.value.details["line"] == 2
    fields = PROMPT + [{"name": "parts", "type": "int", "default": 1}]
    t = simple(fields, '{"1": {"class_type": "X",\n\n "inputs": {"t": {{ prompt }}, "share": {{ 1 / parts }}}}}')
    with pytest.raises(TemplateError, match=r"template 't' failed to render \(workflow.json.j2 line 3\): ZeroDivision"):
        t.render({"prompt": "x", "parts": 0})


def test_a_node_id_or_input_written_twice_is_refused_not_dropped():
    with pytest.raises(TemplateError, match="rendered the key '1' twice"):
        simple(PROMPT, '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}, "1": {"class_type": "Y", "inputs": {}}}')
    t = simple(FIELDS, '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}'
                       '{% if color == "blue" %}, "t": {{ color }}{% endif %}}}}')
    with pytest.raises(TemplateError, match="rendered the key 't' twice"):
        t.render({"prompt": "x", "color": "blue"})


# Schema against workflow ------------------------------------------------------------------------------


def test_a_declared_field_nothing_uses_is_refused_but_one_only_in_the_file_names_is_used():
    fields = PROMPT + [{"name": "colour", "type": "string", "default": ""}]
    with pytest.raises(TemplateError, match="field 'colour' is declared but neither the workflow") as caught:
        simple(fields, '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}')
    assert caught.value.field == "colour"
    t = simple(fields, '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}}}}', filename_pattern="{row}_{Colour}")
    assert [f.name for f in t.fields] == ["prompt", "colour"]


def test_fields_that_would_read_the_same_column_are_refused():
    fields = PROMPT + [{"name": "product_name", "type": "string", "default": ""},
                       {"name": "product__name", "type": "string", "default": ""}]
    with pytest.raises(TemplateError, match="'product_name' and 'product__name' would read the same spreadsheet"):
        simple(fields, '{"1": {"class_type": "X", "inputs": {"t": {{ prompt ~ product_name ~ product__name }}}}}')


def test_a_default_is_kept_as_the_choice_it_names():
    # A blank cell must render as the cell typed with the default would: 512 is the choice "512"
    fields = PROMPT + [{"name": "tile", "type": "choice", "choices": ["256", "512"], "default": 512},
                       {"name": "cfg", "type": "float", "default": 4}]
    t = simple(fields, '{"1": {"class_type": "X", "inputs": {"t": {{ prompt }}, "tile": {{ tile }}, "cfg": {{ cfg }}}}}')
    values, problems = t.coerce_row({"prompt": "x", "tile": "", "cfg": ""}, 2)
    assert problems == [] and values["tile"] == "512"
    assert t.render(values)["1"]["inputs"] == {"t": "x", "tile": "512", "cfg": 4.0}
    assert t.render(values) == t.render(t.coerce_row({"prompt": "x", "tile": "512", "cfg": "4"}, 2)[0])


@pytest.mark.parametrize(("field", "message"), [
    ({"name": "x", "type": "text", "default": "", "max": 200}, "type 'text' cannot have a max"),
    ({"name": "x", "type": "string", "default": "", "min": 3}, "type 'string' cannot have a min"),
    ({"name": "x", "type": "choice", "choices": [1, 2], "default": 1, "max": 2}, "type 'choice' cannot have a max"),
])
def test_a_bound_nothing_would_check_is_refused(field, message):
    with pytest.raises(TemplateError, match=message):
        simple(PROMPT + [field], '{"1": {"class_type": "X", "inputs": {"t": {{ prompt ~ x }}}}}')
