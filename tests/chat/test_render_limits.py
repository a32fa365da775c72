"""Chat templates render in killable worker processes under a time, memory and output budget (chat/render_pool.py);
every template problem is a ValueError that names it, never a Python exception name; the compiled-template cache
is bounded and holds no expanded output. The templates are the ones issue 12 reported."""
import re
import threading

import pytest

from pagedllm.chat.render_pool import RenderLimits, RenderPool
from pagedllm.chat.sandbox import TemplateCache, TemplateFailure, make_environment
from pagedllm.chat.template import MAX_NESTING, prepare_messages, render_chat_template

MESSAGES = [{"role": "user", "content": "hi"}]
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
STRING_LOOPS = "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}"
SHORT = RenderLimits(timeout_s=2.0, max_output_chars=100_000, max_memory_bytes=512 << 20)
PYTHON_NAMES = re.compile(r"\b\w+(Error|Exception)\b|Traceback")


def _failure(template, messages=MESSAGES, limits=SHORT) -> str:
    with pytest.raises(ValueError) as info:
        render_chat_template(template, messages, limits=limits)
    message = str(info.value)
    assert not PYTHON_NAMES.search(message), message
    return message


@pytest.mark.parametrize("template", [NESTED_LOOPS, STRING_LOOPS])
def test_a_template_that_runs_forever_is_stopped_at_the_time_limit(template):
    assert _failure(template) == "The chat template took longer than the limit of 2 seconds to render."
    assert render_chat_template("{{ messages[0].content }}", MESSAGES, limits=SHORT) == "hi"   # a fresh worker


@pytest.mark.parametrize("template,words", [
    ("{{ 'a' * 10**7 }}", "over the limit of 100000 characters"),
    ("{{ 'ab' * 60000 }}", "over the limit of 100000 characters"),
    ("{% for i in range(200) %}{{ 'x' * 1000 }}{% endfor %}", "over the limit of 100000 characters"),
    ("{% for i in range(10**9) %}{% endfor %}", "Range too big"),
    ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "recursed too deeply"),
    ("{{ 'a'|center(10**9) }}", "more memory than the limit of 512 MiB"),
    ("{{ '%0999999999d'|format(1) }}", "more memory than the limit of 512 MiB"),
    ("{{ 1 / 0 }}", "The chat template failed: division by zero"),
])
def test_budget_and_sandbox_failures_name_the_problem(template, words):
    assert words in _failure(template)


def test_output_limit_counts_the_whole_render_not_one_piece():
    ok = render_chat_template("{% for i in range(99) %}{{ 'x' * 1000 }}{% endfor %}", MESSAGES, limits=SHORT)
    assert len(ok) == 99_000


@pytest.mark.parametrize("where", ["content", "extra"])
def test_600_deep_message_is_refused_cleanly(where):
    deep = "x"
    for _ in range(600):
        deep = [deep] if where == "content" else {"a": deep}
    message = {"role": "user", "content": deep} if where == "content" else \
        {"role": "user", "content": "x", "metadata": deep}
    with pytest.raises(ValueError, match=f"nested more than {MAX_NESTING} levels"):
        prepare_messages([message])
    with pytest.raises(ValueError, match=f"nested more than {MAX_NESTING} levels"):
        render_chat_template("{{ messages }}", [message], limits=SHORT)


def test_llm_chat_applies_the_budget(tmp_path):
    from model_factory import make_tiny_model
    from pagedllm import LLM
    llm = LLM(model=str(make_tiny_model(tmp_path, "llama")), device="cpu", max_model_len=128,
              num_gpu_blocks_override=16)
    with pytest.raises(ValueError, match="over the limit of"):
        llm.chat(MESSAGES, chat_template="{{ 'a' * 10**9 }}")
    with pytest.raises(ValueError, match="Range too big"):
        llm.chat(MESSAGES, chat_template="{% for i in range(10**9) %}{% endfor %}")


def test_renders_run_side_by_side_with_a_runaway_one():
    pool = RenderPool(max_workers=3)
    endless = RenderLimits(timeout_s=600.0)
    try:
        result = {}

        def runaway():
            try:
                pool.render(NESTED_LOOPS, {}, endless)
            except TemplateFailure as e:
                result["kind"] = e.kind

        thread = threading.Thread(target=runaway)
        thread.start()
        deadline = threading.Event()
        for _ in range(1200):   # until the runaway render holds a worker (bounded wait)
            if pool._running:
                break
            deadline.wait(0.05)
        busy = list(pool._running)
        assert len(busy) == 1
        # Other renders go to other workers while it runs.
        assert [pool.render("{{ n }}", {"n": i}) for i in range(3)] == ["0", "1", "2"]
        assert thread.is_alive() and busy[0].alive()
        busy[0].proc.kill()   # only a kill ends it before its 600 s
        thread.join(60)
        assert not thread.is_alive() and result["kind"] == "memory"
        assert pool.render("{{ 'ok' }}", {}) == "ok"
    finally:
        pool.close()


def test_template_cache_is_bounded_and_holds_no_rendered_output():
    env = make_environment()
    # No constant folding: the compiled code of 'a' * 10**7 is small; the expansion only happens when rendering.
    assert len(env.compile("{{ 'a' * 10**7 }}", raw=True)) < 5000
    cache = TemplateCache(env, max_entries=3, max_chars=100)
    for i in range(5):
        cache.get(f"{{{{ {i} }}}}")
    assert len(cache) == 3
    cache.get("x" * 90)   # over the character budget with the others: the oldest go first
    assert list(cache._entries) == ["{{ 4 }}", "x" * 90] and cache._chars == 97
    cache.get("y" * 101)  # larger than the whole budget: compiled, not kept
    assert list(cache._entries) == ["{{ 4 }}", "x" * 90]
    with pytest.raises(TemplateFailure, match="does not parse"):
        cache.get("{% for %}")


def test_process_default_limits_apply_to_renders_that_name_none(monkeypatch):
    from pagedllm.chat import render_pool
    monkeypatch.setattr(render_pool, "_default_limits", render_pool.RenderLimits())
    render_pool.set_default_limits(RenderLimits(max_output_chars=50))
    with pytest.raises(ValueError, match="over the limit of 50 characters"):
        render_chat_template("{{ 'x' * 51 }}", MESSAGES)
    assert render_chat_template("{{ 'x' * 50 }}", MESSAGES) == "x" * 50
