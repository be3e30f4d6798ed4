"""Build the offline demo corpus in the MAIR layout from Python's own standard library.

Every public, documented function or method of a fixed list of standard-library modules is one
document; the first sentence of its docstring is the query (CodeSearchNet-style). Two kinds of task:

- doc lookup: document = `module.qualname(signature)` + the docstring without its first sentence;
- code search: document = the function's source with the docstring removed.

Modules are split into disjoint groups, so the evaluation tasks come from modules never seen in
training. Functions whose first sentences are identical become one query with several relevant
documents. The output depends only on the Python version.

    python -m dataset.build_demo [--root dataset] [--max_docs 1000]
"""
import argparse
import ast
import importlib.util
import inspect
import logging
import re
import sys
import textwrap
import time
import tokenize
from pathlib import Path

from file_io import write_jsonl
import mair_config

log = logging.getLogger("build_demo")

DOC_LOOKUP, CODE_SEARCH = "doc lookup", "code search"

# task -> (kind, modules, instruction). Module groups are disjoint.
DEMO_TASKS = {
    "PyDoc-Sys": (DOC_LOOKUP, [
        "os", "posixpath", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp", "fileinput",
        "tarfile", "zipfile", "gzip", "bz2", "lzma", "subprocess", "threading", "queue", "sched",
        "multiprocessing.pool", "multiprocessing.connection", "multiprocessing.managers",
        "multiprocessing.process", "multiprocessing.queues", "multiprocessing.shared_memory",
        "concurrent.futures._base", "concurrent.futures.process", "concurrent.futures.thread",
        "logging", "logging.handlers", "logging.config", "platform", "sysconfig", "shlex",
        "selectors", "asyncio.base_events", "asyncio.events", "asyncio.streams", "asyncio.tasks",
        "asyncio.locks", "asyncio.queues", "asyncio.subprocess", "asyncio.transports"],
        "Given a one-sentence description of what a Python standard-library function does, "
        "retrieve the documentation entry of that function."),
    "PyCode-Text": (CODE_SEARCH, [
        "string", "textwrap", "difflib", "codecs", "base64", "quopri", "html", "html.parser",
        "json.encoder", "json.decoder", "json", "csv", "configparser", "gettext", "locale",
        "calendar", "fractions", "statistics", "random", "pprint", "reprlib", "plistlib",
        "xml.dom.minidom", "xml.dom.pulldom", "xml.etree.ElementTree", "xml.sax.saxutils",
        "xml.sax.handler", "xml.sax.xmlreader", "colorsys", "heapq", "bisect", "shelve", "dbm",
        "netrc", "secrets", "hmac"],
        "Given a description of a behaviour, retrieve the Python function whose source code "
        "implements it."),
    "PyDoc-Net": (DOC_LOOKUP, [
        "socket", "socketserver", "ssl", "http.client", "http.server", "http.cookies",
        "http.cookiejar", "urllib.request", "urllib.parse", "urllib.robotparser", "smtplib",
        "imaplib", "poplib", "ftplib", "mailbox", "email.message", "email.utils", "email.header",
        "email.feedparser", "email.generator", "email.policy", "email.headerregistry",
        "email.contentmanager", "email.iterators", "email.charset", "mimetypes", "ipaddress",
        "xmlrpc.client", "xmlrpc.server", "wsgiref.handlers", "wsgiref.headers", "wsgiref.util",
        "wsgiref.simple_server", "wsgiref.validate", "webbrowser", "uuid"],
        "A user describes what a Python networking or e-mail function should do; find the "
        "reference documentation of the standard-library function that does it."),
    "PyCode-Dev": (CODE_SEARCH, [
        "inspect", "ast", "dis", "pdb", "bdb", "pydoc", "doctest", "unittest.case", "unittest.mock",
        "unittest.loader", "unittest.runner", "unittest.suite", "unittest.result", "traceback",
        "symtable", "pickletools", "code", "codeop", "cmd", "importlib.util", "importlib.abc",
        "importlib.metadata", "importlib.resources.abc", "typing", "trace", "profile", "pstats",
        "timeit", "tokenize", "tabnanny", "pyclbr", "modulefinder", "compileall", "py_compile",
        "linecache", "warnings", "argparse", "optparse", "functools", "contextlib", "dataclasses",
        "enum", "copy", "collections", "abc", "weakref", "operator", "types"],
        "Find the implementation in Python's developer tooling (debuggers, introspection, testing, "
        "typing) that matches the description of what the code does."),
    # development tasks: the demo's settings are chosen on these (benchmarks/tune_demo.py), never on the
    # evaluation tasks; neither their queries nor their modules are in any training data
    "PyDoc-Tune": (DOC_LOOKUP, [
        "turtle", "_pydecimal", "numbers", "graphlib", "zipimport", "getopt", "getpass", "pkgutil", "runpy",
        "pickle", "tracemalloc", "rlcompleter", "zoneinfo._zoneinfo", "tomllib._parser"],
        "Given what a Python function does, in one sentence, find the reference entry of the "
        "standard-library function (graphics, numbers, packaging, serialisation) that does it."),
    "PyCode-Tune": (CODE_SEARCH, [
        "_pyio", "_collections_abc", "importlib._bootstrap_external", "importlib._bootstrap", "site",
        "ntpath", "genericpath", "venv", "xml.dom.expatbuilder", "ctypes", "multiprocessing.util",
        "curses.textpad"],
        "Given a description of what some Python code does, find the standard-library function whose "
        "source implements it."),
}

MIN_QUERY_WORDS, MAX_QUERY_WORDS = 4, 40
_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)[.!?](?=\s+[A-Z(`'\"]|\s*$)")


def split_first_sentence(docstring):
    """(first sentence, rest) of a cleaned docstring; the first sentence ends its first paragraph at latest."""
    text = inspect.cleandoc(docstring)
    paragraphs = re.split(r"\n\s*\n", text, maxsplit=1)
    first_par = " ".join(paragraphs[0].split())
    match = _SENTENCE_END.search(first_par)
    cut = match.end() if match else len(first_par)
    first, tail = first_par[:cut].strip(), first_par[cut:].strip()
    rest_parts = [tail] if tail else []
    if len(paragraphs) > 1:
        rest_parts.append(paragraphs[1].strip())
    return first, "\n".join(rest_parts).strip()


def strip_docstring(source):
    """Source of a function with its docstring lines removed (None if nothing but the docstring is left)."""
    source = textwrap.dedent(source)
    tree = ast.parse(source)
    node = tree.body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    body = node.body
    if not (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        return None
    if len(body) == 1:
        return None
    lines = source.splitlines()
    start, end = body[0].lineno - 1, body[0].end_lineno
    kept = lines[:start] + lines[end:]
    return "\n".join(line.rstrip() for line in kept if line.strip()) + "\n"


_ACCESSORS = {"property", "setter", "getter", "deleter", "overload", "cached_property"}


def _is_accessor(node):
    names = {ast.unparse(d).split(".")[-1].split("(")[0] for d in node.decorator_list}
    return bool(names & _ACCESSORS)


def _public_defs(body, kinds):
    """Public definitions of a module or class body by name (a later definition replaces an earlier one)."""
    defs = {}
    for node in body:
        if isinstance(node, kinds) and not node.name.startswith("_"):
            defs[node.name] = node
    return defs


def _source_file(module_name):
    spec = importlib.util.find_spec(module_name)
    if spec is None:
        return None
    if (spec.origin or "").endswith(".py"):
        return spec.origin
    path = getattr(importlib.import_module(module_name), "__file__", None)  # frozen stdlib modules
    return path if path and path.endswith(".py") else None


def iter_functions(module_name):
    """(qualified name, function node, source lines) for the public functions and methods of a module.

    Read statically from the module's source file, so the corpus does not depend on what other
    libraries have imported or patched at run time.
    """
    path = _source_file(module_name)
    if path is None:
        log.warning("module %s has no Python source on this installation; skipped", module_name)
        return
    with tokenize.open(path) as f:
        source = f.read()
    lines = source.splitlines()
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    top = _public_defs(ast.parse(source).body, functions + (ast.ClassDef,))
    for name in sorted(top):
        node = top[name]
        if isinstance(node, ast.ClassDef):
            methods = _public_defs(node.body, functions)
            for meth in sorted(methods):
                if not _is_accessor(methods[meth]):
                    yield f"{module_name}.{name}.{meth}", methods[meth], lines
        elif not _is_accessor(node):
            yield f"{module_name}.{name}", node, lines


def function_source(node, lines):
    """Dedented source of a function definition, decorators included."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return textwrap.dedent("\n".join(lines[first - 1:node.end_lineno])) + "\n"


def make_document(kind, qualified, node, lines, rest):
    if kind == DOC_LOOKUP:
        returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
        return f"{qualified}({ast.unparse(node.args)}){returns}\n{rest}".strip()
    try:
        return strip_docstring(function_source(node, lines))
    except SyntaxError:
        return None


def build_task(task, max_docs):
    """(docs, queries) of one demo task."""
    kind, modules, instruction = DEMO_TASKS[task]
    docs, by_query = [], {}
    for module_name in modules:
        for qualified, node, lines in iter_functions(module_name):
            docstring = ast.get_docstring(node, clean=False)
            if not docstring:
                continue
            query, rest = split_first_sentence(docstring)
            if not (MIN_QUERY_WORDS <= len(query.split()) <= MAX_QUERY_WORDS) or not query[0].isalpha():
                continue
            doc = make_document(kind, qualified, node, lines, rest)
            if not doc:
                continue
            docs.append({"id": qualified, "doc": doc})
            by_query.setdefault(query, []).append(qualified)
            if len(docs) >= max_docs:
                break
        if len(docs) >= max_docs:
            break
    queries = [{"qid": f"{task}-q{i}", "instruction": instruction, "query": query,
                "labels": [{"id": doc_id, "score": 1} for doc_id in ids]}
               for i, (query, ids) in enumerate(by_query.items())]
    return docs, queries


def build(root=None, max_docs=1000, tasks=None):
    """Write every demo task under `root`; return {task: (n_docs, n_queries)}."""
    sizes = {}
    for task in tasks or DEMO_TASKS:
        docs, queries = build_task(task, max_docs)
        write_jsonl(docs, mair_config.docs_path(task, root))
        write_jsonl(queries, mair_config.queries_path(task, root))
        sizes[task] = (len(docs), len(queries))
        log.info("%-12s %-11s %4d docs %4d queries -> %s", task, DEMO_TASKS[task][0], len(docs),
                 len(queries), Path(mair_config.docs_path(task, root)).parent.parent)
    return sizes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="dataset root (default: mair_config.DATA_ROOT)")
    parser.add_argument("--max_docs", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.time()
    assert set(DEMO_TASKS) == set(mair_config.DEMO_TASK_DOMAIN), "demo tasks differ from mair_config"
    build(args.root, args.max_docs)
    log.info("demo corpus built in %.1f s (Python %s)", time.time() - start, sys.version.split()[0])


if __name__ == "__main__":
    main()
