"""The operator's console (/ui) in Debian's Chromium against a real server and worker on the tiny model:
upload (drag and drop, file chooser, a refused file), train from the form and watch it finish, the
report with its confusion matrix, the model with its loss curve and the classify playground, an
evaluation and two reports side by side, a long job followed live and cancelled, and the API-key
prompt. Screenshots of every page go to test-artifacts/ui/.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import httpx
import pytest
from playwright.sync_api import expect

from app.data.sample import generate_sample_dialogues, to_cmcc_csv

pytestmark = [pytest.mark.ui, pytest.mark.timeout(1500)]

# A tiny_test job with its validation takes well under a minute alone on 2 cores; far longer when the
# cores are shared with other work, which must not fail the test.
JOB_TIMEOUT_MS = 480_000
BAD_CSV = "sentence_sep,c_numerical,label_raw\n您好[SEP]取消彩铃,1,办理取消\n您好[SEP]开通流量,abc,办理开通\n"


def _csv(per_label: int, seed: int) -> str:
    return to_cmcc_csv(generate_sample_dialogues(per_label=per_label, seed=seed))


def _drop_file(page, selector: str, name: str, text: str) -> None:
    """Drag and drop a file onto the page, as a person dragging it from their file manager would."""
    transfer = page.evaluate_handle("""([name, text]) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([text], name, { type: "text/csv" }));
        return transfer;
    }""", [name, text])
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def _shot(page, artifacts, name: str) -> None:
    page.evaluate("document.fonts.ready.then(() => true)")
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


def _id_in_url(page) -> str:
    return page.url.rsplit("/", 1)[1]


def _assert_chinese_renders(page) -> None:
    """With no CJK font on this machine, the page must have loaded the server's (else: empty boxes)."""
    fc_list = shutil.which("fc-list")
    local = fc_list and subprocess.run([fc_list, ":lang=zh", "family"], capture_output=True, text=True).stdout.strip()
    if not local:
        _until(page, """[...document.fonts].some(f => f.family.includes("IntentTuner CJK")
                                                     && f.status === "loaded")""")


def _until(page, expression: str, timeout_s: float = 30) -> None:
    """Poll a JavaScript expression until it is true (the page's CSP forbids wait_for_function's eval)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout_s} s: {expression}")
        page.wait_for_timeout(250)


def _image_loaded(page, element_id: str) -> None:
    _until(page, f"""(() => {{ const img = document.getElementById("{element_id}");
                      return Boolean(img && img.complete && img.naturalWidth > 500); }})()""")


def _wait_final(page, status: str) -> None:
    expect(page.locator("#view")).to_have_attribute("data-final", status, timeout=JOB_TIMEOUT_MS)


def test_operator_walks_through_the_console(start_server, browser, artifacts):
    server = start_server()
    api = httpx.Client(base_url=server.url, timeout=30)
    page = browser.new_page()

    # The console's own policy refuses other hosts before any request is made (Content-Security-Policy) ...
    page.goto(f"{server.url}/ui")
    violated = page.evaluate("""new Promise((resolve) => {
        document.addEventListener("securitypolicyviolation", (e) => resolve(e.violatedDirective), { once: true });
        fetch("https://cdn.example.invalid/chart.js").catch(() => null);
    })""")
    assert violated == "connect-src"
    # ... and the test's guard catches (and aborts inside the browser) any request that gets past it.
    page.goto(f"{server.url}/health")
    with page.expect_event("requestfailed"):
        page.evaluate("fetch('https://cdn.example.invalid/chart.js').catch(() => null)")
    assert browser.foreign_requests == ["https://cdn.example.invalid/chart.js"]
    browser.foreign_requests.clear()

    # Datasets: drag and drop the training set.
    page.goto(f"{server.url}/ui#/datasets")
    expect(page.locator("#datasets-table")).to_contain_text("No dataset yet")
    expect(page.locator("#health")).to_contain_text("1 worker live")
    page.fill("#dataset-name", "train")
    _drop_file(page, "#dropzone", "train.csv", _csv(3, 1))
    page.wait_for_url(re.compile(r"#/datasets/ds_\w+$"))
    train_id = _id_in_url(page)
    expect(page.locator("#label-distribution .bar-label")).to_have_count(34)
    expect(page.locator("#label-distribution")).to_contain_text("33 · 咨询（含查询）电商货品信息")
    expect(page.locator('[data-card="imbalance"] .value')).to_have_text("1.0×")
    expect(page.locator('[data-card="Rows"] .value')).to_have_text("102")
    _assert_chinese_renders(page)
    _shot(page, artifacts, "02-dataset-detail")

    # The validation set through the file chooser, then a file the server refuses: row and field shown.
    page.goto(f"{server.url}/ui#/datasets")
    page.fill("#dataset-name", "validation")
    page.set_input_files("#dataset-file", files=[{"name": "validation.csv", "mimeType": "text/csv",
                                                  "buffer": _csv(1, 2).encode()}])
    page.wait_for_url(re.compile(r"#/datasets/ds_\w+$"))
    validation_id = _id_in_url(page)
    page.goto(f"{server.url}/ui#/datasets")
    _drop_file(page, "#dropzone", "bad.csv", BAD_CSV)
    error = page.locator("#upload-status .form-error")
    expect(error).to_contain_text("row 3")
    expect(error).to_contain_text("c_numerical")
    expect(page.locator("#datasets-table tbody tr")).to_have_count(2)  # nothing of the refused file stored
    _shot(page, artifacts, "01-datasets-upload-error")

    # Jobs: the form, prefilled from the dataset page's link; train 30 steps and watch it finish.
    page.goto(f"{server.url}/ui#/jobs?dataset={train_id}")
    expect(page.locator("#job-dataset")).to_have_value(train_id)
    expect(page.locator("#job-validation")).to_have_value(validation_id)
    expect(page.locator("#job-config")).to_have_value("tiny_test")
    page.fill("#hp-max_steps", "30")
    page.fill("#hp-eval_every_steps", "10")  # validation during training: steps 10, 20, 30
    page.select_option("#hp-class_balance", "sqrt")
    _shot(page, artifacts, "03-jobs-form")
    page.click("#job-submit")
    page.wait_for_url(re.compile(r"#/jobs/job_\w+$"))
    job_id = _id_in_url(page)
    _wait_final(page, "succeeded")
    expect(page.locator("#job-phase")).to_have_text("Done: trained 30 steps, evaluated 34 dialogues")
    expect(page.locator("#loss-chart")).to_have_attribute("data-points", "30")
    expect(page.locator("#loss-chart")).to_have_attribute("data-extra-points", "6")  # accuracy + macro-F1 x 3
    for kind in ("queued", "started", "base_model", "model_loaded", "checkpoint_saved", "finished",
                 "class_balance", "validation", "best_checkpoint", "baseline",
                 "evaluation_started", "evaluation_progress", "model_registered", "report", "succeeded"):
        expect(page.locator(f'#job-events tr[data-kind="{kind}"]').first).to_be_attached()
    expect(page.locator('#job-events tr[data-kind="train_log"]')).to_have_count(0)  # hidden unless asked
    page.check("#show-step-logs")
    expect(page.locator('#job-events tr[data-kind="train_log"]')).to_have_count(30)
    page.uncheck("#show-step-logs")
    _shot(page, artifacts, "04-job-finished")
    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["progress"]["step"] == 30
    assert job["hyperparameters"]["class_balance"] == "sqrt" and job["hyperparameters"]["eval_every_steps"] == 10

    # Its report: the cards agree with the API, the confusion matrix is drawn, per-class F1 worst first.
    page.click("#open-report")
    page.wait_for_url(re.compile(r"#/reports/rep_\w+$"))
    first_report = _id_in_url(page)
    assert first_report == job["report_id"]
    report = api.get(f"/reports/{first_report}").json()["metrics"]
    for key in ("accuracy", "macro_f1", "weighted_f1"):
        expect(page.locator(f'[data-card="{key}"] .value')).to_have_text(f"{report[key]:.3f}")
    expect(page.locator('[data-card="unparseable"] .value')).to_have_text(str(report["n_failed"]))
    # Beside the TF-IDF baseline trained on the same training set, and the calibration of its probabilities.
    lift = report["lift"]["macro_f1"]
    expect(page.locator('[data-card="macro_f1_lift"] .value')).to_have_text(f"{'+' if lift > 0 else ''}{lift:.3f}")
    expect(page.locator("#baseline-lift tbody tr")).to_have_count(3)
    expect(page.locator("#baseline-lift")).to_contain_text(f"{report['baseline']['macro_f1']:.3f}")
    expect(page.locator('[data-card="ece"] .value')).to_have_text(f"{report['ece']:.3f}")
    _image_loaded(page, "reliability-diagram")
    _image_loaded(page, "confusion-matrix")
    expect(page.locator("#per-class-f1 .bar-label")).to_have_count(34)
    f1s = [float(text.split()[0]) for text in page.locator("#per-class-f1 .bar-value").all_inner_texts()]
    assert f1s == sorted(f1s)
    wrong = api.get(f"/reports/{first_report}/errors").json()
    expect(page.locator("#wrong-table tbody tr")).to_have_count(min(20, len(wrong)) or 1)
    if wrong:
        expect(page.locator("#wrong-table")).to_contain_text(wrong[0]["text"])
    _shot(page, artifacts, "05-report")

    # The model: its loss curve and the classify playground.
    page.goto(f"{server.url}/ui#/models/{job['model_id']}")
    expect(page.locator("#model-loss-chart")).to_have_attribute("data-points", "30")
    page.fill("#classify-text", "您好请讲[SEP]我要开通一个流量包")
    page.select_option("#classify-top-k", "3")
    page.click("#classify-submit")
    expect(page.locator("#classify-top .bar-label")).to_have_count(3, timeout=120_000)
    expect(page.locator("#classify-latency")).to_contain_text(re.compile(r"Server [\d,.]+ ms"))
    labels = {f"{label['id']} · {label['name']}" for label in api.get(f"/models/{job['model_id']}").json()["labels"]}
    assert page.locator("#classify-label-name").inner_text() in labels
    _shot(page, artifacts, "06-model-classify")

    # Evaluate the model on the training set from its page: progress in dialogues, then a second report.
    page.select_option("#evaluate-dataset", train_id)
    page.click("#evaluate-submit")
    page.wait_for_url(re.compile(r"#/jobs/job_\w+$"))
    assert _id_in_url(page) != job_id
    _wait_final(page, "succeeded")
    expect(page.locator("#job-phase")).to_have_text("Done: evaluated 102 dialogues")
    _shot(page, artifacts, "07-evaluation-job")
    page.click("#open-report")
    page.wait_for_url(re.compile(r"#/reports/rep_\w+$"))
    second_report = _id_in_url(page)
    page.select_option("#compare-with", first_report)
    page.click("#compare-button")
    page.wait_for_url(re.compile(rf"#/reports/{second_report}/vs/{first_report}$"))
    for side in ("A", "B"):
        _image_loaded(page, f"matrix-{side}")
        expect(page.locator(f"#per-class-{side} .bar-label")).to_have_count(34)
    expect(page.locator("#compare-per-class tbody tr")).to_have_count(34)
    _shot(page, artifacts, "08-reports-compare")

    # A long job followed live (progress, ETA, the loss curve growing), then cancelled from the page.
    page.goto(f"{server.url}/ui#/jobs?dataset={train_id}")
    page.select_option("#job-validation", "")
    page.fill("#hp-max_steps", "20000")
    page.click("#job-submit")
    page.wait_for_url(re.compile(r"#/jobs/job_\w+$"))
    _until(page, "Number(document.getElementById('loss-chart')?.dataset.points) >= 3", JOB_TIMEOUT_MS / 1000)
    expect(page.locator("#job-status")).to_contain_text("running")
    expect(page.locator("#job-phase")).to_have_text(re.compile(r"^Training: step \d+ / 20000$"))
    expect(page.locator("#job-eta")).to_contain_text("ETA")
    _shot(page, artifacts, "09-job-running")
    page.click("#job-cancel")
    _wait_final(page, "cancelled")
    expect(page.locator('#job-events tr[data-kind="cancel_requested"]')).to_be_attached()
    expect(page.locator("#job-phase")).to_have_text(re.compile(r"^Cancelled at step \d+ / 20000$"))

    # The lists.
    page.goto(f"{server.url}/ui#/jobs")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(3)
    _shot(page, artifacts, "10-jobs-list")
    page.goto(f"{server.url}/ui#/models")
    expect(page.locator("#adapters-table tbody tr")).to_have_count(1)  # a cancelled job registers no model
    _shot(page, artifacts, "11-models")
    page.goto(f"{server.url}/ui#/reports")
    expect(page.locator("#reports-table tbody tr")).to_have_count(2)
    for box in page.locator("#reports-table tbody input[type=checkbox]").all():
        box.check()
    expect(page.locator("#compare-selected")).to_be_enabled()
    _shot(page, artifacts, "12-reports-list")


def test_console_asks_for_the_api_key_once(start_server, browser, artifacts):
    server = start_server(api_key="s3cret-key", worker=False)
    page = browser.new_page()
    page.goto(f"{server.url}/ui")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    _shot(page, artifacts, "13-api-key-prompt")

    page.fill("#key-input", "wrong-key")
    page.click("#key-submit")
    expect(page.locator("#key-error")).to_contain_text("refused")
    page.fill("#key-input", "s3cret-key")
    page.click("#key-submit")
    expect(dialog).to_be_hidden()
    expect(page.locator("#datasets-table")).to_contain_text("No dataset yet")
    expect(page.locator("#key-button")).to_be_visible()

    # The key is kept for the session: an upload (multipart) and the other pages ask no more.
    _drop_file(page, "#dropzone", "train.csv", _csv(1, 4))
    page.wait_for_url(re.compile(r"#/datasets/ds_\w+$"))
    expect(page.locator("#label-distribution .bar-label")).to_have_count(34)
    for fragment, ready in (("#/jobs", "#job-form"), ("#/models", "#adapters-table"), ("#/reports", "#reports-table")):
        page.goto(f"{server.url}/ui{fragment}")
        expect(page.locator(ready)).to_be_visible()
        expect(dialog).to_be_hidden()
    assert httpx.get(f"{server.url}/datasets").status_code == 401  # the server, not the page, enforces it
