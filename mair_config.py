"""MAIR task registry, shared corpora, demo tasks and the dataset path helpers every script uses.

A task outside the registry is accepted when its corpus is on disk (MAIR-Docs/<task>/docs.jsonl under
the data root): a user's own corpus, or a BEIR set brought in by `python -m dataset.beir`. Its
domain comes from an optional MAIR-Docs/<task>/task.json `{"domain": "..."}`, else CUSTOM_DOMAIN.

Layout (all under DATA_ROOT, default `dataset/` next to this file, or $ZEROGR_DATA):
    MAIR-Docs/<task>/docs.jsonl                          {"id", "doc"}
    MAIR-Queries/<task>/queries.jsonl                    {"qid", "instruction", "query", "labels"}
    MAIR-Data/<model_sufix>-<num_q>/<corpus>/queries.jsonl   pseudo-queries
    MAIR-Data/DocAsQ-<n>/<corpus>/queries.jsonl          document-as-query examples (DOCASQ_MODE random)
    MAIR-Data/DocAsQ-lead/<corpus>/queries.jsonl         ... (DOCASQ_MODE leading)
    MAIR-Data/gist_ids/<corpus>/<gist_type>.jsonl        DocIDs {"id", "gist"}
"""
import difflib
import os
from pathlib import Path

from file_io import DataError, read_json

DATA_ROOT = os.environ.get("ZEROGR_DATA", str(Path(__file__).resolve().parent / "dataset"))

# MAIR task -> domain (126 tasks, names as in the MAIR-Bench datasets).
TASK_DOMAIN = {
    "Competition-Math": "Academic",
    "ProofWiki_Proof": "Academic",
    "ProofWiki_Reference": "Academic",
    "Stacks_Proof": "Academic",
    "Stacks_Reference": "Academic",
    "Stein_Proof": "Academic",
    "Stein_Reference": "Academic",
    "Trench_Proof": "Academic",
    "Trench_Reference": "Academic",
    "TAD": "Academic",
    "TAS2": "Academic",
    "StackMathQA": "Academic",
    "APPS": "Code",
    "CodeEditSearch": "Code",
    "CodeSearchNet": "Code",
    "Conala": "Code",
    "HumanEval-X": "Code",
    "LeetCode": "Code",
    "MBPP": "Code",
    "RepoBench": "Code",
    "TLDR": "Code",
    "SWE-Bench-Lite": "Code",
    "Apple": "Finance",
    "ConvFinQA": "Finance",
    "FinQA": "Finance",
    "FinanceBench": "Finance",
    "HC3Finance": "Finance",
    "TAT-DQA": "Finance",
    "Trade-the-event": "Finance",
    "AY2": "Web",
    "ELI5": "Web",
    "Fever": "Web",
    "TREx": "Web",
    "WnCw": "Web",
    "WnWi": "Web",
    "WoW": "Web",
    "zsRE": "Web",
    "AILA2019-Case": "Legal",
    "AILA2019-Statutes": "Legal",
    "BSARD": "Legal",
    "BillSum": "Legal",
    "CUAD": "Legal",
    "GerDaLIR": "Legal",
    "LeCaRDv2": "Legal",
    "LegalQuAD": "Legal",
    "REGIR-EU2UK": "Legal",
    "REGIR-UK2EU": "Legal",
    "ArguAna": "Web",
    "CQADupStack": "Web",
    "FiQA": "Finance",
    "NFCorpus": "Medical",
    "Quora": "Web",
    "SciDocs": "Academic",
    "SciFact": "Academic",
    "TopiOCQA": "Web",
    "Touche": "Web",
    "Trec-Covid": "Medical",
    "ACORDAR": "Web",
    "CPCD": "Web",
    "ChroniclingAmericaQA": "Web",
    "Monant": "Medical",
    "NTCIR": "Web",
    "PointRec": "Web",
    "ProCIS-Dialog": "Web",
    "ProCIS-Turn": "Web",
    "QuanTemp": "Web",
    "WebTableSearch": "Web",
    "CARE": "Medical",
    "MISeD": "Web",
    "SParC": "Web",
    "SParC-SQL": "Web",
    "Spider": "Web",
    "Spider-SQL": "Web",
    "LitSearch": "Academic",
    "CAsT_2019": "Web",
    "CAsT_2020": "Web",
    "CAsT_2021": "Web",
    "CAsT_2022": "Web",
    "Core_2017": "Web",
    "Microblog_2011": "Web",
    "Microblog_2012": "Web",
    "Microblog_2013": "Web",
    "Microblog_2014": "Web",
    "PrecisionMedicine_2017": "Medical",
    "PrecisionMedicine_2018": "Medical",
    "PrecisionMedicine_2019": "Medical",
    "PrecisionMedicine-Article_2019": "Medical",
    "PrecisionMedicine-Article_2020": "Medical",
    "CliniDS_2014": "Medical",
    "CliniDS_2015": "Medical",
    "CliniDS_2016": "Medical",
    "ClinicalTrials_2021": "Medical",
    "ClinicalTrials_2022": "Medical",
    "ClinicalTrials_2023": "Medical",
    "DD_2015": "Web",
    "DD_2016": "Web",
    "DD_2017": "Web",
    "FairRanking_2020": "Academic",
    "FairRanking_2021": "Web",
    "FairRanking_2022": "Web",
    "Genomics-AdHoc_2004": "Medical",
    "Genomics-AdHoc_2005": "Medical",
    "Genomics-AdHoc_2006": "Medical",
    "Genomics-AdHoc_2007": "Medical",
    "TREC-Legal_2011": "Legal",
    "NeuCLIR-Tech_2023": "Web",
    "NeuCLIR_2022": "Web",
    "NeuCLIR_2023": "Web",
    "ProductSearch_2023": "Web",
    "ToT_2023": "Web",
    "ToT_2024": "Web",
    "FoodAPI": "Code",
    "HuggingfaceAPI": "Code",
    "PytorchAPI": "Code",
    "SpotifyAPI": "Code",
    "TMDB": "Code",
    "TensorAPI": "Code",
    "ToolBench": "Code",
    "WeatherAPI": "Code",
    "ExcluIR": "Web",
    "Core17": "Web",
    "News21": "Web",
    "Robust04": "Web",
    "InstructIR": "Web",
    "NevIR": "Web",
    "IFEval": "Web",
}

SHARE_CORPUS = {
    "AY2": ["AY2", "ELI5", "Fever", "TREx", "WnCw", "WnWi", "WoW", "zsRE"],
    "ProCIS-Dialog": ["ProCIS-Dialog", "ProCIS-Turn"],
    "CAsT_2019": ["CAsT_2019", "CAsT_2020"],
    "CAsT_2021": ["CAsT_2021", "CAsT_2022"],
    "PrecisionMedicine_2017": ["PrecisionMedicine_2017", "PrecisionMedicine_2018"],
    "Article_2019": ["PrecisionMedicine-Article_2019", "PrecisionMedicine-Article_2020"],
    "CliniDS_2014": ["CliniDS_2014", "CliniDS_2015", "CliniDS_2016"],
    "ClinicalTrials_2021": ["ClinicalTrials_2021", "ClinicalTrials_2022"],
    "AdHoc_2004": ["Genomics-AdHoc_2004", "Genomics-AdHoc_2005"],
    "AdHoc_2006": ["Genomics-AdHoc_2006", "Genomics-AdHoc_2007"],
    "NeuCLIR_2022": ["NeuCLIR_2022", "NeuCLIR_2023"],
    "ToT_2023": ["ToT_2023", "ToT_2024"],
}

DOMAINS = ["Medical", "Finance", "Academic", "Code", "Legal", "Web"]
# Domain names in the paper's tables -> names in this config.
PAPER_DOMAINS = {"Medical": "Medical", "Financial": "Finance", "Academic": "Academic",
                 "Coding": "Code", "Legal": "Legal", "Web-based": "Web"}
# BEIR datasets that MAIR carries (the paper's exact BEIR list is unknown; see PAPER.md 3.1). MAIR's
# "Fever" is KILT's FEVER over the KILT Wikipedia (it shares the AY2 corpus), not BEIR's: not listed.
BEIR_TASKS = ["ArguAna", "CQADupStack", "FiQA", "NFCorpus", "Quora", "SciDocs", "SciFact",
              "Touche", "Trec-Covid"]
# BEIR dataset name -> the MAIR task that carries (a sample of) the same dataset: dataset/beir.py takes
# its instruction from there, and data.eval_overlap treats the two names as one dataset.
BEIR_MAIR_TASK = {"arguana": "ArguAna", "cqadupstack": "CQADupStack", "fiqa": "FiQA", "nfcorpus": "NFCorpus",
                  "quora": "Quora", "scidocs": "SciDocs", "scifact": "SciFact", "webis-touche2020": "Touche",
                  "trec-covid": "Trec-Covid", "fever": "Fever"}
# Domains of tasks outside the registry (task.json): BEIR sets count in the BEIR average, every other
# non-MAIR domain gets its own column and stays out of the MAIR average.
BEIR_DOMAIN = "BEIR"
CUSTOM_DOMAIN = "Custom"
TASK_FILE = "task.json"

# Offline demo tasks built by `python -m dataset.build_demo` from Python's own standard library.
DEMO_TASK_DOMAIN = {
    "PyDoc-Sys": "Code",     # train: doc lookup, OS / files / concurrency modules
    "PyCode-Text": "Code",   # train: code search, text / data-format modules
    "PyDoc-Net": "Code",     # eval: doc lookup, network / mail modules (unseen modules)
    "PyCode-Dev": "Code",    # eval: code search, developer-tool modules (unseen modules)
    "PyDoc-Tune": "Code",    # development: doc lookup on modules of neither kind, for choosing the demo's settings
    "PyCode-Tune": "Code",   # development: code search, likewise
}
DEMO_TRAIN_TASKS = ["PyDoc-Sys", "PyCode-Text"]
DEMO_EVAL_TASKS = ["PyDoc-Net", "PyCode-Dev"]
DEMO_DEV_TASKS = ["PyDoc-Tune", "PyCode-Tune"]


class UnknownTaskError(KeyError):
    def __str__(self):
        return self.args[0]


def _known_tasks():
    return {**TASK_DOMAIN, **DEMO_TASK_DOMAIN}


def task_file(task, root=None):
    """The optional `{"domain": ...}` file of a task outside the registry, next to its docs."""
    return os.path.join(os.path.dirname(docs_path(task, root)), TASK_FILE)


def custom_task_domain(task, root=None):
    """Domain of a task outside the registry whose docs.jsonl is under `root`: its task.json's
    "domain" (a paper domain name is mapped to ours), else CUSTOM_DOMAIN; None when it is not on disk."""
    if not isinstance(task, str) or task in ("", ".", "..") or os.path.basename(task) != task \
            or not os.path.isfile(docs_path(task, root)):
        return None
    path = task_file(task, root)
    if not os.path.exists(path):
        return CUSTOM_DOMAIN
    spec = read_json(path)
    domain = spec.get("domain") if isinstance(spec, dict) else None
    if not isinstance(domain, str) or not domain.strip():
        raise DataError(f'{path}: expected {{"domain": "<name>"}}, got {spec!r}')
    return PAPER_DOMAINS.get(domain.strip(), domain.strip())


def check_task(task, root=None):
    """Return `task` if it is a MAIR or demo task, or a task whose docs.jsonl is on disk under `root`
    (default DATA_ROOT); else raise UnknownTaskError with suggestions."""
    known = _known_tasks()
    if task not in known and custom_task_domain(task, root) is None:
        close = difflib.get_close_matches(task, list(known), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownTaskError(f"unknown task '{task}' (not in mair_config.TASK_DOMAIN or DEMO_TASK_DOMAIN, and no "
                               f"{docs_path(task, root)}; $ZEROGR_DATA sets the data root){hint}")
    return task


def task_domain(task, root=None):
    known = _known_tasks()
    return known[task] if task in known else custom_task_domain(check_task(task, root), root)


def check_domain(domain):
    """Accept a config domain name or a paper table name; return the config name."""
    if domain in DOMAINS:
        return domain
    if domain in PAPER_DOMAINS:
        return PAPER_DOMAINS[domain]
    raise ValueError(f"unknown domain '{domain}': use one of {DOMAINS} or {list(PAPER_DOMAINS)}")


def get_tasks_by_domain(domain):
    domain = check_domain(domain)
    return [task for task, d in TASK_DOMAIN.items() if d == domain]


def get_all_tasks():
    return list(TASK_DOMAIN)


def corpus_of(task, root=None):
    """Name of the corpus a task's documents belong to: its SHARE_CORPUS key, or the task itself."""
    check_task(task, root)
    for corpus, members in SHARE_CORPUS.items():
        if task in members:
            return corpus
    return task


def tasks_of_corpus(corpus, root=None):
    """Tasks whose documents form `corpus` (the first one holds the documents on disk)."""
    if corpus in SHARE_CORPUS:
        return list(SHARE_CORPUS[corpus])
    return [check_task(corpus, root)]


def corpora_of(tasks, root=None):
    """Distinct corpora of `tasks`, in first-seen order."""
    return list(dict.fromkeys(corpus_of(t, root) for t in tasks))


def _root(root):
    return root if root is not None else DATA_ROOT


def docs_path(task, root=None):
    return os.path.join(_root(root), "MAIR-Docs", task, "docs.jsonl")


def queries_path(task, root=None):
    return os.path.join(_root(root), "MAIR-Queries", task, "queries.jsonl")


def split_docs_path(path):
    """(root, task) of a `<root>/MAIR-Docs/<task>/docs.jsonl` path; None for a path outside that layout."""
    path = Path(path)
    if path.name != "docs.jsonl" or path.parent.parent.name != "MAIR-Docs":
        return None
    return str(path.parent.parent.parent), path.parent.name


def corpus_docs_path(corpus, root=None):
    """The docs file of a corpus: that of its first task."""
    return docs_path(tasks_of_corpus(corpus, root)[0], root)


def pseudo_queries_path(corpus, model_sufix="QG", num_q=16, root=None):
    return os.path.join(_root(root), "MAIR-Data", f"{model_sufix}-{num_q}", corpus, "queries.jsonl")


def docasq_path(corpus, n=16, root=None, mode="random"):
    """The document-as-query file of DOCASQ_MODE `mode` ("random": `n` windows per document; "leading":
    each document's first words, whatever `n`): one folder per mode, so no mode reads another's file."""
    folders = {"random": f"DocAsQ-{n}", "leading": "DocAsQ-lead"}
    if mode not in folders:
        raise ValueError(f"DOCASQ_MODE={mode!r} has no document-as-query file (one of {', '.join(map(repr, folders))})")
    return os.path.join(_root(root), "MAIR-Data", folders[mode], corpus, "queries.jsonl")


def gist_path(corpus, gist_type="title", root=None):
    return os.path.join(_root(root), "MAIR-Data", "gist_ids", corpus, f"{gist_type}.jsonl")


def shard_path(final_path, pid, total_num):
    """`.../<name>.jsonl` -> `.../<name>-<pid>-<total_num>.jsonl`."""
    stem, ext = os.path.splitext(final_path)
    return f"{stem}-{pid}-{total_num}{ext}"
