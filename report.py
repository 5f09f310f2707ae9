"""The pages a person looks at: dpt.py's report.html of a run (its verdict, the
summary of both halves of DPT's claim, curves, samples as the judges see them)
and the page of a sweep of seeds (each run's figures, their mean, spread and
paired intervals), drawn from results.json and the run folder's files alone with
the standard library: curves and bars as inline SVG, samples as inline PNG, no
script and no network.

    python dpt.py --report runs/shapes-1l-s0     # redraw an old run's report.html
"""

import base64
import html
import itertools
import json
import math
import os
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F

import plumbing
from plumbing import UserError

# -----------------------------------------------------------------------------
# The report: report.html, one page a person can look at, self-contained (no
# script, no network, the images inline), built from results.json and the run
# folder's files alone, so `python dpt.py --report RUN` redraws an old run.


def write_report(run):
    path = os.path.join(run, "report.html")
    plumbing.write_text(build_report(run), path)
    return path


REPORT = """<p class="verdict">{verdict}</p>
<table class="summary">{summary}</table>
<h2>Training</h2>
<div class="plots">
{accuracy}
{loss}
</div>
<h2>Generated images, {per_class}{some_classes}</h2>
<p>Beside each row: the share of that class's generated images that each judge puts in the class they were
generated for. Neither saw them. The stage-1 classifier says what DPT believes (it approves its own confusions);
the oracle, the same classifier trained on every true label ({oracle_accuracy}
on the test set), says what is true.{models}</p>
{copies}<table class="grid">{grid}</table>
<h2>Wall time</h2>
{timings}
<details><summary>device, versions and the full config</summary><pre>{details}</pre>
</details>"""


def build_report(run):
    """The page, as a string, from the files of a finished run."""
    results = plumbing.read_json(os.path.join(run, "results.json"))
    if results is None:
        raise UserError(f"--report {run}: no results.json there; give a finished run folder, or finish "
                        "the run first (its command resumes it)")

    def load(name, redo):
        return plumbing.read_artifact(os.path.join(run, name), redo, mmap=True)
    loss = [("loss", thin(load("stage2/diffusion.pt", "stage2")["metrics"]["history"], 400))]
    generation = results.get("generation") or {}
    references = "few_labels" in generation
    sample_sets = {name: load(SAMPLE_FILES[name], "sample") for name in generation} or {"dpt": load("samples.pt",
                                                                                                    "sample")}
    grid, shown, classes = sample_rows(results, sample_sets)
    labels = results["labels_per_class"]
    title = (f"DPT on {results['dataset']}, {labels} label{'s' * (labels != 1)} per class, seed {results['seed']}, "
             f"preset {results['preset']}")
    details = json.dumps({"device": results["device"], "versions": results["versions"],
                          "config": results["config"]}, indent=2)
    return page(title, REPORT.format(
        verdict=html.escape(verdict(results)), summary=summary_table(results),
        accuracy=svg_plot(accuracy_curves(run, results, load), "optimizer step", "test accuracy (%)"),
        loss=svg_plot(loss, "images seen", "diffusion loss"),
        some_classes="" if shown == classes else f" (50 of the {classes})",
        per_class="three rows per class: the labeled images alone, DPT, every label" if references else
        "one row per class",
        models=" The three diffusion models share stage 2's recipe, sampler and noise; only their labels differ: "
        "the labeled images alone (the rest the null class), stage 1's pseudo labels (DPT), every true label."
        * references, copies=copies_note(generation),
        oracle_accuracy=html.escape(percent(results["oracle_accuracy"])), grid=grid,
        timings=svg_bars(results["wall_time_s"]), details=html.escape(details, quote=False)))


def summary_heading(what):
    """A summary row's heading cell; one indented is under the row before it."""
    if what.startswith(" "):
        return f'<th class="sub">{html.escape(what.strip())}</th>'
    return f"<th>{html.escape(what)}</th>"


def summary_table(results):
    """The rows of the summary the command prints, as HTML table rows."""
    return "".join(f"<tr>{summary_heading(what)}<td>{html.escape(value)}</td></tr>"
                   for what, value in summary_rows(results))


def accuracy_curves(run, results, load):
    """(name, [(step, accuracy in %)]) of each classifier this run measured, so not
    an old baseline's that --redo stage1 left out. The imagenet preset's probe has
    no curve (it is fit, not trained in steps): no classifier.pt."""
    curves = (("stage 1", "stage1", "stage1", "stage1_accuracy"), ("stage 3", "stage3", "stage3", "stage3_accuracy"),
              ("baseline", "baseline", "stage1", "baseline_accuracy"))  # (name, folder, its --redo, its field)
    return [(name, [(step, 100 * value) for step, value in load(f"{folder}/classifier.pt", redo)["metrics"]
                    ["history"]]) for name, folder, redo, field in curves
            if results[field] is not None and os.path.exists(os.path.join(run, folder, "classifier.pt"))]


# The diffusion models a run samples, in the order the report and the summary show
# them: (results.json's name, what it is called there, its samples in the run folder).
MODELS = (("few_labels", "labeled images alone", "few_labels/samples.pt"),
          ("dpt", "DPT (pseudo labels)", "samples.pt"),
          ("every_label", "every label", "every_label/samples.pt"))
SAMPLE_FILES = {name: file for name, _, file in MODELS}


def thumbnail(images):
    """uint8 images at most 64 pixels high, shrunk by averaging where they are larger."""
    return images if images.shape[-1] <= 64 else F.interpolate(images.float(), size=64, mode="area").round().byte()


def judge_cell(share):
    """A judge's share of a row's images in their class, as a bar and a percentage; "-" where it did not judge."""
    if share is None:
        return "<td class=\"judge\">-</td>"
    return (f'<td class="judge"><span class="track"><span style="width:{100 * share:.1f}%"></span>'
            f'</span>{100 * share:.0f}%</td>')


def sample_rows(results, sample_sets):
    """(HTML rows, classes shown, classes): for each class (50 spread over them
    at most) its name, and a row per diffusion model in sample_sets: its first
    ten generated images of the class as one inline PNG (64 pixels high at most)
    and each judge's share of them in the class as a bar (the stage-1 judge's of
    DPT's alone)."""
    names = results.get("classes") or [f"class {c}" for c in range(len(results["sample_accuracy_per_class"]))]
    shown = range(len(names)) if len(names) <= 50 else torch.linspace(0, len(names) - 1, 50).round().int().tolist()
    generation = results.get("generation") or {}
    models = [(name, called) for name, called, _ in MODELS if name in sample_sets]

    def row(c, name, called):
        samples = sample_sets[name]
        believed = results["sample_accuracy_per_class"][c] if name == "dpt" else None
        true = (generation[name]["oracle_share_per_class"] if name in generation else
                results["oracle_sample_accuracy_per_class"])[c]
        head = (f'<th rowspan="{len(models)}">{html.escape(str(names[c]))}</th>' if name == models[0][0] else "")
        return (f'<tr class="{"first" if head else "next"}">{head}<td class="model">{called}</td><td><img alt="'
                f'{html.escape(str(names[c]))}, {called}" src="data:image/png;base64,'
                f'{png_row(thumbnail(samples["images"][samples["labels"] == c][:10]))}"></td>'
                f'{judge_cell(believed)}{judge_cell(true)}</tr>')
    rows = "<tr><th></th><th></th><th></th><th>stage-1 judge</th><th>oracle judge</th></tr>" + "".join(
        row(c, name, called) for c in shown for name, called in models)
    return rows, len(shown), len(names)


def copies_note(generation):
    """A paragraph where the few-label model's class share flatters it: its
    samples are of their class as often as DPT's, or more, yet cover less of
    the test images (lower recall): copies of its few labeled images."""
    few, dpt = generation.get("few_labels"), generation.get("dpt")
    if few is None or few["recall"] is None or not (few["oracle_share"] >= dpt["oracle_share"]
                                                    and few["recall"] < dpt["recall"]):
        return ""
    return (f'<p class="note">The few-label model\'s class share ({percent(few["oracle_share"])}, DPT\'s '
            f'{percent(dpt["oracle_share"])}) flatters it: its recall is {few["recall"]:.2f} against DPT\'s '
            f'{dpt["recall"]:.2f}, so its samples cover less of the test images, as copies of its few labeled '
            "images would.</p>\n")


def points_apart(difference):
    """How far one accuracy lies from another, as "2.50 points above" (or below)."""
    return f"{100 * abs(difference):.2f} points {'above' if difference >= 0 else 'below'}"


def verdict(results):
    """One sentence: did this run show DPT's claim? Stage 3 against stage 1 and
    against the labeled images alone; a stage 1 below the labeled images alone is
    a failed semi-supervised stage, and then no gain over it is a success."""
    gain, baseline = results["stage3_gain"], results["baseline_accuracy"]
    if gain is None:
        return "No test set: the gain of stage 3 over stage 1 cannot be measured."
    stage1, stage3 = results["stage1_accuracy"], results["stage3_accuracy"]
    versus_labeled = "" if baseline is None else f"{points_apart(stage3 - baseline)} the labeled images alone"
    if baseline is not None and stage1 < baseline:
        return (f"Stage 1 fell {points_apart(stage1 - baseline)} the labeled images alone: the semi-supervised stage "
                f"failed, so stage 3's {100 * gain:+.2f} points over it are no success of DPT (stage 3 is "
                f"{points_apart(stage3 - baseline)} the labeled images alone)." + generation_verdict(results))
    if gain > 0:
        return (f"DPT worked: stage 3 is {points_apart(gain)} stage 1"
                f"{versus_labeled and ' and ' + versus_labeled}." + generation_verdict(results))
    return (f"Stage 3 is {points_apart(gain)} stage 1{versus_labeled and ' (' + versus_labeled + ')'}: this run does "
            "not show DPT's gain." + generation_verdict(results))


def generation_verdict(results):
    """The generator's half, as a second sentence (empty without the references):
    do DPT's samples beat the few-label model's in the oracle's eyes, more often
    of their class and closer to the test images, and how far are they from
    every label's?"""
    generation = results.get("generation") or {}
    few, dpt, every = generation.get("few_labels"), generation.get("dpt"), generation.get("every_label")
    if few is None:
        return ""
    distances = few["feature_fd"] is not None
    more, closer = dpt["oracle_share"] > few["oracle_share"], distances and dpt["feature_fd"] < few["feature_fd"]
    if more and (closer or not distances):
        opening = "DPT's samples beat those of the labeled images alone"
    elif more:
        opening = ("DPT's samples are of their class more often than those of the labeled images alone, but lie "
                   "farther from the test images")
    elif closer:
        opening = ("DPT's samples lie closer to the test images than those of the labeled images alone, but are of "
                   "their class less often")
    else:
        opening = "DPT's samples do not beat those of the labeled images alone"
    share = {name: percent(model["oracle_share"]) for name, model in generation.items()}
    fd = {name: formatted(model["feature_fd"], ".2f") for name, model in generation.items()}
    text = f" {opening}: the oracle puts {share['dpt']} of them in their class against {share['few_labels']}"
    text += f", at a Fréchet distance in its features of {fd['dpt']} against {fd['few_labels']}" if distances else ""
    if every is not None:
        text += f"; with every label, {share['every_label']}" + (f" at {fd['every_label']}" if distances else "")
    return text + "."


def sample_accuracy(predicted, labels, num_classes):
    """The share of generated images that a judge (its labels: `predicted`) puts
    in the class they were generated for, overall and per class (None for a
    class with no images)."""
    right = predicted == labels
    per_class = [right[labels == c].float().mean().item() if (labels == c).any() else None
                 for c in range(num_classes)]
    return {"accuracy": right.float().mean().item(), "per_class": per_class}


def last_moves(history, count=3):
    """How far the test accuracy moved over the last `count` evaluations (max -
    min), the check that a classifier ended where its curve settled; None with
    fewer evaluations."""
    values = [accuracy for _, accuracy in history[-count:]]
    return max(values) - min(values) if len(values) == count else None


def formatted(value, spec, scale=1, unit=""):
    """A figure as text: value times scale in the format spec, then its unit; "-" where it was not measured."""
    return "-" if value is None else f"{scale * value:{spec}}{unit}"


def percent(value):
    return formatted(value, ".2f", 100, "%")


def signed_points(gain):
    return formatted(gain, "+.2f", 100, " points")


def minutes(results):
    """A run's wall time in minutes, every stage it ran (the cached oracle excluded)."""
    return sum(results["wall_time_s"].values()) / 60


def print_summary(results, run):
    """The run's end on stdout: the verdict, the summary table, where everything is."""
    print(verdict(results))
    rows = summary_rows(results)
    width = max(len(what) for what, _ in rows)
    print("\n".join(f"  {what:<{width}}  {value}" for what, value in rows))
    print(f"everything is in {run}: report.html (open it in a browser), results.json, samples.png, samples.pt")


def summary_rows(results):
    """(what, value) rows of the summary that the command prints and the report shows."""
    rows = [("labeled images only (--baseline)", percent(results["baseline_accuracy"])),
            ("stage 1: semi-supervised", percent(results["stage1_accuracy"])),
            ("pseudo labels of the training images", percent(results["pseudo_label_accuracy"])),
            ("generated images of the intended class, stage-1 judge", percent(results["sample_accuracy"])),
            ("generated images of the intended class, oracle judge", percent(results["oracle_sample_accuracy"])),
            ("stage 3: with generated images", percent(results["stage3_accuracy"])),
            ("gain of stage 3 over stage 1", signed_points(results["stage3_gain"]))]
    if results["baseline_accuracy"] is not None and results["stage3_accuracy"] is not None:
        rows.append(("gain of stage 3 over the labeled images only",
                     signed_points(results["stage3_accuracy"] - results["baseline_accuracy"])))
    for name, stage in (("stage 1", "stage1"), ("stage 3", "stage3")):  # settled: at most a point
        rows.append((f"{name}: moved over its last 3 evaluations",
                     formatted(results[f"{stage}_last_moves"], ".2f", 100, " points")))
    rows += [("oracle (every true label): test accuracy", percent(results["oracle_accuracy"])),
             ("FID of the samples", formatted(results["fid"], ".2f"))]
    generation = results.get("generation") or {}
    if "few_labels" in generation:  # one row per diffusion model, as the oracle judges its samples
        rows.append(("diffusion models, judged by the oracle",
                     "class share · Fréchet distance · precision · recall"))
        for name, called, _ in MODELS:
            model = generation[name]
            rows.append((f"  {called}", f"{percent(model['oracle_share'])} · {formatted(model['feature_fd'], '.2f')}"
                         f" · {formatted(model['precision'], '.2f')} · {formatted(model['recall'], '.2f')}"
                         + ("" if model.get("fid") is None else f" · FID {model['fid']:.2f}")))
    rows.append(("wall time", f"{minutes(results):.1f} min"))
    if results.get("skipped_images"):
        rows.append(("unreadable images left out (--skip-bad-images)", f"{results['skipped_images']:,}"))
    return rows


# -----------------------------------------------------------------------------
# A sweep of seeds (dpt.py --seeds): every run's figures, their mean and standard
# deviation, as a printed table and a page linking each run's report.

SWEEP_COLUMNS = (  # (heading, results.json field, a percentage)
    ("labeled only", "baseline_accuracy", True), ("stage 1", "stage1_accuracy", True),
    ("stage 3", "stage3_accuracy", True), ("gain", "stage3_gain", True),
    ("pseudo labels", "pseudo_label_accuracy", True), ("stage-1 judge", "sample_accuracy", True),
    ("oracle judge", "oracle_sample_accuracy", True), ("minutes", "minutes", False))
# The generator's half: each diffusion model's figures, results.json's
# generation[model][figure] as the field model_figure (few_labels_feature_fd).
GENERATION_FIGURES = (("class share", "oracle_share", True), ("Fréchet distance", "feature_fd", False),
                      ("precision", "precision", True), ("recall", "recall", True))
GENERATION_COLUMNS = tuple((f"{heading} {short_name}", f"{model}_{field}", is_percent)
                           for (_, field, is_percent), heading in zip(GENERATION_FIGURES, ("share", "FD", "P", "R"))
                           for model, short_name in (("few_labels", "few"), ("dpt", "DPT"), ("every_label", "every")))

# The gains a paper states, each paired seed by seed: (name, the better field, the field it is measured over).
# The generator's are DPT - few labels and every label - DPT of each figure (a Fréchet distance: lower is better).
SWEEP_GAINS = (("stage 1 over labeled only", "stage1_accuracy", "baseline_accuracy"),
               ("stage 3 over stage 1", "stage3_accuracy", "stage1_accuracy"),
               ("stage 3 over labeled only", "stage3_accuracy", "baseline_accuracy"),
               *((f"{figure}: {better_name} - {over_name}", f"{better}_{field}", f"{over}_{field}")
                 for figure, field, _ in GENERATION_FIGURES
                 for better, better_name, over, over_name in (("dpt", "DPT", "few_labels", "few labels"),
                                                              ("every_label", "every label", "dpt", "DPT"))))
IN_POINTS = {field for _, field, is_percent in SWEEP_COLUMNS + GENERATION_COLUMNS if is_percent}


def paired_gain(differences):
    """The mean of paired differences (one a seed) with its 95% confidence
    interval, Student's t with n - 1 degrees of freedom: mean +- t_0.975 s / sqrt(n)
    (no interval from one seed), and how many differences are above zero."""
    import scipy.stats
    n = len(differences)
    mean = float(np.mean(differences))
    half = float(scipy.stats.t.ppf(0.975, n - 1) * np.std(differences, ddof=1) / math.sqrt(n)) if n > 1 else None
    return {"mean": mean, "low": None if half is None else mean - half, "high": None if half is None else mean + half,
            "above": sum(difference > 0 for difference in differences), "runs": n}


def sweep_summary(runs):
    """Every run's figures (from its results.json), their mean and sample
    standard deviation over the seeds, and each gain's paired interval."""
    rows = []
    for run in runs:
        results = plumbing.read_json(os.path.join(run, "results.json"))
        generation = results.get("generation") or {}
        rows.append({"seed": results["seed"], "run": run, "minutes": minutes(results),
                     **{field: results[field] for _, field, _ in SWEEP_COLUMNS if field != "minutes"},
                     **{f"{model}_{field}": generation.get(model, {}).get(field)
                        for model, _, _ in MODELS for _, field, _ in GENERATION_FIGURES}})
    summary = {"runs": rows, "mean": {}, "std": {}, "gains": {}}
    for _, field, _ in SWEEP_COLUMNS + GENERATION_COLUMNS:
        values = [row[field] for row in rows if row[field] is not None]
        summary["mean"][field] = float(np.mean(values)) if values else None
        summary["std"][field] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    for name, better, over in SWEEP_GAINS:
        differences = [row[better] - row[over] for row in rows if row[better] is not None and row[over] is not None]
        if differences:
            summary["gains"][name] = {**paired_gain(differences), "points": better in IN_POINTS}
    gains = [row["stage3_gain"] for row in rows if row["stage3_gain"] is not None]
    summary["stage3_above_stage1"] = f"{sum(gain > 0 for gain in gains)} of {len(gains)}"
    return summary


def sweep_figure(value, is_percent):
    """A cell of a sweep's table: a share in % to 2 decimals, other figures (minutes, a distance) to 1."""
    return formatted(value, ".2f", 100) if is_percent else formatted(value, ".1f")


def sweep_table(summary, columns=SWEEP_COLUMNS):
    """The summary as text rows: a heading, one row per seed, mean +- std."""
    header = ["seed"] + [heading for heading, _, _ in columns]
    rows = [[str(row["seed"])] + [sweep_figure(row[field], is_percent) for _, field, is_percent in columns]
            for row in summary["runs"]]

    def mean_and_spread(field, is_percent):
        mean, std = sweep_figure(summary["mean"][field], is_percent), summary["std"][field]
        return mean if std is None else mean + " ± " + sweep_figure(std, is_percent)  # one seed has no spread
    rows.append(["mean ± std"] + [mean_and_spread(field, is_percent) for _, field, is_percent in columns])
    return [header] + rows


def gain_lines(summary):
    """Each gain as a paper states it: mean [95% CI] (in points where the figure
    is a percentage), and the runs above zero."""
    def line(name, gain):
        scale, unit = (100, " points") if gain.get("points", True) else (1, "")
        interval = "" if gain["low"] is None else f" [{scale * gain['low']:+.2f}, {scale * gain['high']:+.2f}]"
        return (f"{name}: {scale * gain['mean']:+.2f}{unit}{interval} (95% CI, paired over seeds), "
                f"above in {gain['above']} of {gain['runs']} runs")
    return [line(name, gain) for name, gain in summary["gains"].items()]


def html_cells(row, tag):
    """Each text of row escaped, as an HTML cell <tag>."""
    return "".join(f"<{tag}>{html.escape(cell)}</{tag}>" for cell in row)


def write_sweep(runs, path, title):
    """The sweep's summary as path.json, a table printed, and path.html beside the runs."""
    summary = sweep_summary(runs)
    plumbing.write_json(summary, path + ".json")
    table = sweep_table(summary)
    generated = any(summary["mean"][field] is not None for _, field, _ in GENERATION_COLUMNS)
    generation_table = sweep_table(summary, GENERATION_COLUMNS) if generated else None

    def print_table(rows):
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        print("\n".join("  " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows))
    print_table(table)
    print(f"stage 3 above stage 1 in {summary['stage3_above_stage1']} runs (accuracies in %, gain in points)")
    if generated:
        print_table(generation_table)
        print("the diffusion models of the labeled images alone (few), DPT's pseudo labels and every label, judged by "
              "the oracle: its class share, precision (P) and recall (R) in %, the Fréchet distance (FD) in its "
              "features")
    print("\n".join("  " + line for line in gain_lines(summary)))
    folder = os.path.dirname(path)
    links = [f'<a href="{html.escape(os.path.relpath(row["run"], folder))}/report.html">{row["seed"]}</a>'
             for row in summary["runs"]]
    bars = [(name, [None if row[field] is None else 100 * row[field] for row in summary["runs"]])
            for name, field in (("baseline", "baseline_accuracy"), ("stage 1", "stage1_accuracy"),
                                ("stage 3", "stage3_accuracy"))]

    def html_table(rows):  # the heading, a row per seed led by the link to its report, the mean
        return (f"<table class=\"sweep\"><tr>{html_cells(rows[0], 'th')}</tr>"
                + "".join(f"<tr><td>{link}</td>{html_cells(row[1:], 'td')}</tr>" for link, row in zip(links, rows[1:]))
                + f"<tr><th>{rows[-1][0]}</th>{html_cells(rows[-1][1:], 'th')}</tr></table>")
    body = (html_table(table)
            + ("" if generation_table is None else
               "<h2>The diffusion models, judged by the oracle</h2><p>Stage 2's recipe and noise on the labeled "
               "images alone (few), on stage 1's pseudo labels (DPT) and on every true label (every): the share of "
               "their samples the oracle puts in the intended class (share), precision (P) and recall (R, k = 3) in "
               "%, and the Fréchet distance (FD), the last three in the oracle's penultimate features against the "
               "test images.</p>"
               + html_table(generation_table))
            + "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in gain_lines(summary)) + "</ul>"
            + '<div class="plots">'
            + svg_seed_bars([str(row["seed"]) for row in summary["runs"]],
                            [(name, values) for name, values in bars if any(v is not None for v in values)])
            + svg_intervals({name: gain for name, gain in summary["gains"].items() if gain["points"]}) + "</div>"
            + f"<p>Stage 3 above stage 1 in {summary['stage3_above_stage1']} runs. Accuracies on the test set in %, "
            "the gain in points (stage 3 minus stage 1, seed by seed), standard deviation over seeds; each mean "
            "gain with its 95% confidence interval, Student's t over the seeds' paired differences. The stage-1 "
            "judge is the share of generated images the stage-1 classifier puts in their intended class, the "
            "oracle judge the same share by a classifier trained on every true label.</p>")
    plumbing.write_text(page(title, body), path + ".html")
    return path + ".html"


# -----------------------------------------------------------------------------
# Pictures for dpt.py's report.html: a page, rows of images as inline PNG, lines
# and bars as inline SVG; no script, no network, the standard library alone.

COLOURS = {"stage 1": "#1f77b4", "stage 3": "#d62728", "baseline": "#7f7f7f", "loss": "#2ca02c"}


def page(title, body):
    """A self-contained HTML page: the run's report, or a sweep's summary."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body {{ font: 15px/1.4 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222 }}
table {{ border-collapse: collapse }} th, td {{ padding: 2px 10px; text-align: left }}
.verdict {{ font-size: 18px }} .summary th {{ font-weight: normal }} .summary th.sub {{ padding-left: 2em }}
.summary td {{ font-weight: bold; text-align: right }}
.plots {{ display: flex; flex-wrap: wrap; gap: 2em }}
.grid img {{ height: 48px; image-rendering: pixelated; display: block }}
.grid tr.first > * {{ border-top: 1px solid #ccc }} .grid .model {{ font-size: 13px; color: #555 }}
.note {{ background: #fff4e0; padding: 0.5em 1em }}
.judge {{ font-size: 13px; white-space: nowrap }} pre {{ background: #f4f4f4; padding: 1em; overflow: auto }}
.track {{ display: inline-block; width: 120px; height: 12px; background: #e8e8e8; margin-right: 6px }}
.track span {{ display: block; height: 100%; background: #1f77b4 }}
.sweep td, .sweep th {{ text-align: right; white-space: nowrap }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{body}
</body></html>
"""


def thin(points, most):
    """At most `most` evenly spaced points of a long history, the last one kept."""
    step = -(-len(points) // most)
    return points[::step] + ([points[-1]] if (len(points) - 1) % step else [])


def png_chunk(kind, body):
    """A PNG chunk (PNG spec, sec. 5.3): the body's length, the kind, the body, the CRC of kind and body."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_row(images):
    """uint8 images [N, C, H, W] (C = 1 or 3) side by side as a base64 PNG, written
    here (PNG spec, sec. 5 and 11: one IHDR, the rows zlib-compressed, each after a
    0 filter byte, IEND) rather than by torchvision, whose import alone takes 1.8 s
    of a script's start and whose encode_png is deprecated."""
    row = torch.cat(list(images), dim=2).permute(1, 2, 0).contiguous().numpy()  # H, W, C
    height, width, channels = row.shape
    header = struct.pack(">IIBBBBB", width, height, 8, {1: 0, 3: 2}[channels], 0, 0, 0)  # 8 bits, grey or RGB
    pixels = zlib.compress(b"".join(b"\x00" + line.tobytes() for line in row))
    png = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


def ticks(low, high, count=5):
    """Round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten)."""
    raw = (high - low) / count
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.ceil(low / step), math.floor(high / step) + 1)]


def short(value):
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def svg_plot(series, x_label, y_label, width=500, height=280):
    """Lines of (x, y) points as inline SVG, with ticked axes, their labels and a
    legend; every point is a vertex (and a dot, where there are few). A non-finite
    value (a diverged loss) is a gap in its line, and the plot says how many."""
    points = [point for _, line in series for point in line]
    gaps = sum(not math.isfinite(y) for _, y in points)
    points = [(x, y) for x, y in points if math.isfinite(y)]
    if not points:
        return f"<p>no finite {y_label} recorded</p>"
    (x_low, x_high), (y_low, y_high) = ((min(v), max(v)) for v in zip(*points))
    margin = 0.05 * (y_high - y_low) or 1  # a flat line is drawn across the middle
    x_low, x_high, y_low, y_high = min(x_low, 0), max(x_high, 1), y_low - margin, y_high + margin
    left, right, top, bottom = 60, 110, 10, 45

    def to_x(x):
        return left + (x - x_low) / (x_high - x_low) * (width - left - right)

    def to_y(y):
        return height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom)
    svg = [f'<svg width="{width}" height="{height}" font-size="12" role="img" aria-label="{y_label}">',
           f'<path d="M{left},{top}V{height - bottom}H{width - right}" stroke="#444" fill="none"/>']
    for x in ticks(x_low, x_high):
        svg.append(f'<text x="{to_x(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{short(x)}</text>')
    for y in ticks(y_low, y_high):
        svg.append(f'<text x="{left - 6}" y="{to_y(y) + 4:.1f}" text-anchor="end">{short(y)}</text>'
                   f'<path d="M{left},{to_y(y):.1f}H{width - right}" stroke="#eee"/>')
    svg.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">{x_label}</text>'
               f'<text transform="translate(14,{(top + height - bottom) / 2}) rotate(-90)" '
               f'text-anchor="middle">{y_label}</text>')
    for row, (name, line) in enumerate(series):
        colour = COLOURS[name]
        for finite, run in itertools.groupby(line, key=lambda point: math.isfinite(point[1])):
            if finite:  # one polyline per run of finite points
                vertices = " ".join(f"{to_x(x):.1f},{to_y(y):.1f}" for x, y in run)
                svg.append(f'<polyline data-series="{name}" points="{vertices}" fill="none" stroke="{colour}" '
                           'stroke-width="2"/>')
        if len(line) <= 20:
            svg += [f'<circle cx="{to_x(x):.1f}" cy="{to_y(y):.1f}" r="3" fill="{colour}"/>' for x, y in line
                    if math.isfinite(y)]
        svg.append(f'<text x="{width - right + 10}" y="{top + 12 + 16 * row}" fill="{colour}">{name}</text>')
    if gaps:
        svg.append(f'<text x="{left + 8}" y="{top + 14}" fill="#b00">{gaps} non-finite values: gaps in the line</text>')
    return "\n".join(svg + ["</svg>"])


def svg_seed_bars(seeds, series, height=280):
    """Each seed a category: its bars side by side, one per series (name, [value
    or None a seed]), on a test-accuracy axis from 0, as inline SVG."""
    left, right, top, bottom, group = 60, 110, 10, 45, 16 * len(series) + 12
    width = left + right + group * len(seeds)
    high = max([value for _, values in series for value in values if value is not None] + [1])

    def to_y(y):
        return height - bottom - y / high * (height - top - bottom)
    svg = [f'<svg width="{width}" height="{height}" font-size="12" role="img" aria-label="test accuracy by seed">',
           f'<path d="M{left},{top}V{height - bottom}H{width - right}" stroke="#444" fill="none"/>']
    for y in ticks(0, high):
        svg.append(f'<text x="{left - 6}" y="{to_y(y) + 4:.1f}" text-anchor="end">{short(y)}</text>'
                   f'<path d="M{left},{to_y(y):.1f}H{width - right}" stroke="#eee"/>')
    for column, seed in enumerate(seeds):
        x = left + group * column + 6
        svg.append(f'<text x="{x + (group - 12) / 2:.1f}" y="{height - bottom + 16}" text-anchor="middle">{seed}'
                   '</text>')
        for row, (name, values) in enumerate(series):
            if values[column] is not None:
                svg.append(f'<rect data-series="{name}" data-seed="{seed}" x="{x + 16 * row}" '
                           f'y="{to_y(values[column]):.1f}" width="14" height="{to_y(0) - to_y(values[column]):.1f}" '
                           f'fill="{COLOURS[name]}"><title>{name}, seed {seed}: {values[column]:.2f}%</title></rect>')
    svg.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">seed</text>'
               f'<text transform="translate(14,{(top + height - bottom) / 2}) rotate(-90)" '
               'text-anchor="middle">test accuracy (%)</text>')
    svg += [f'<text x="{width - right + 10}" y="{top + 12 + 16 * row}" fill="{COLOURS[name]}">{name}</text>'
            for row, (name, _) in enumerate(series)]
    return "\n".join(svg + ["</svg>"])


def svg_intervals(gains, width=560):
    """Each mean gain (points) a dot with its 95% interval as a whisker, beside
    a line at zero, as inline SVG."""
    if not gains:
        return ""
    left, right, row_height = 190, 20, 28
    ends = [100 * value for gain in gains.values() for value in (gain["mean"], gain["low"], gain["high"])
            if value is not None] + [0]
    low, high = min(ends), max(ends)
    margin = 0.1 * (high - low) or 1
    low, high = low - margin, high + margin

    def to_x(x):
        return left + (x - low) / (high - low) * (width - left - right)
    height = row_height * len(gains) + 30
    svg = [f'<svg width="{width}" height="{height}" font-size="12" role="img" aria-label="mean gains">',
           f'<path d="M{to_x(0):.1f},4V{height - 26}" stroke="#444" stroke-dasharray="3,3"/>']
    for x in ticks(low, high):
        svg.append(f'<text x="{to_x(x):.1f}" y="{height - 10}" text-anchor="middle">{short(x)}</text>')
    for row, (name, gain) in enumerate(gains.items()):
        y = row_height * row + 16
        svg.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{html.escape(name)}</text>')
        if gain["low"] is not None:
            svg.append(f'<path data-gain="{name}" d="M{to_x(100 * gain["low"]):.1f},{y}H{to_x(100 * gain["high"]):.1f}'
                       f'M{to_x(100 * gain["low"]):.1f},{y - 5}v10M{to_x(100 * gain["high"]):.1f},{y - 5}v10" '
                       'stroke="#222" stroke-width="1.5"/>')
        svg.append(f'<circle cx="{to_x(100 * gain["mean"]):.1f}" cy="{y}" r="4" fill="#d62728"><title>{name}: '
                   f'{100 * gain["mean"]:+.2f} points</title></circle>')
    return "\n".join(svg + ["</svg>"])


def svg_bars(seconds, width=600):
    """Wall time per stage, one horizontal bar each, as inline SVG."""
    longest = max(seconds.values(), default=0) or 1
    svg = [f'<svg width="{width}" height="{22 * len(seconds) + 4}" font-size="12" role="img" aria-label="wall time">']
    for row, (stage, time_s) in enumerate(seconds.items()):
        y = 22 * row + 2
        length = (width - 220) * time_s / longest
        svg.append(f'<text x="70" y="{y + 14}" text-anchor="end">{stage}</text>'
                   f'<rect data-stage="{stage}" x="80" y="{y}" width="{length:.1f}" height="16" fill="#1f77b4"/>'
                   f'<text x="{86 + length:.1f}" y="{y + 14}">'
                   + (f"{time_s:.0f} s" if time_s < 60 else f"{time_s / 60:.1f} min") + "</text>")
    return "\n".join(svg + ["</svg>"])
