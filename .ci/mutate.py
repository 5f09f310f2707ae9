"""Prove that tests can fail: break the code on purpose, one mutation at a time,
run the tests that should catch it, report CAUGHT or MISSED, and restore the file.

    python .ci/mutate.py                      # every mutation (about 11 minutes on 2 cores)
    python .ci/mutate.py "no label bound"     # one

Each mutation is (file, text, replacement, pytest -k expression). A mutation whose
text no longer occurs stops the script: update the table with the code it checks.
"""
import os
import subprocess
import sys

os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
MUTATIONS = {  # issue 44: a refusal costs nothing, every input known by its contents, every count bounded
 "check after remove": ("dpt.py", "    check_kept(config, run, dataset, configuration.STAGES[:first], removed)\n", "", "refused_command_leaves"),
 "walk unshared": ("imagenet.py", "        files = class_images(os.path.join(folder, name), walked)", "        files = class_images(os.path.join(folder, name))", "holds_each_image"),
 "no label bound": ("data.py", "    if num_classes > len(train_y):", "    if False:", "malformed_file and 10"),
 "seed range": ("configuration.py", "and all(map(plumbing.SEED[0], seeds))", "", "seeds_and"),
 "no fid check": ("configuration.py", "                read(path)\n", "                pass\n", "seeds_and"),
 "no memory bound": ("dpt.py", "    if held > plumbing.memory_bytes():", "    if False:", "more_samples"),
 "no sigterm": ("plumbing.py", "    default = signal.signal(signal.SIGTERM, exit_unwinding)", "    default = signal.getsignal(signal.SIGTERM)", "sigterm"),
 "no temporaries removed": ("plumbing.py", "            remove_temporaries(folder)  #", "            pass  #", "sigkill"),
 "identity by path": ("dpt.py", "plumbing.file_identity(getattr(config, name)) for name in configuration.FILE_SETTINGS}}", "getattr(config, name) for name in configuration.FILE_SETTINGS}}", "input_files_are_known or label_subset_edited"),
 "no fid inputs": ("dpt.py", "        check_fid_inputs(config, [path(FID_FILES[name]) for name in FID_FILES])", "        pass", "refused_command_leaves and FID"),
 "no network check": ("dpt.py", "        imagenet.msn_for(config, \"cpu\"), imagenet.load_autoencoder(config.autoencoder, config.autoencoder_size)", "        pass", "input_files_are_known"),
 "uint16 advice": ("data.py", "if 255 < largest <= 65535", "if False", "malformed_file"),
 "config advice": ("dpt.py", 'advice="the settings its files were made with are unknown; delete the folder "', 'advice="the settings are unknown "', "refused_command_leaves and config"),
 # issue 45: the GPU path
 "gradients set to None": ("unet.py", "        plumbing.zero_grad(optimizer)", "        optimizer.zero_grad(set_to_none=True)", "accumulated_micro"),
 "no compiler reset": ("plumbing.py", "        torch.compiler.reset()", "        pass", "own_static_graph"),
 "a CPU's rate the mean step": ("plumbing.py", "min(self.seconds or math.inf, elapsed)", "elapsed", "step_clock"),
 "a GPU waited for each step": ("plumbing.py", "        if self.on_cuda and not last:\n            return\n", "", "step_clock"),
 "RandAugment draws always": ("data.py", "    offset = int(torch.randint(len(names), ())) if n % len(names) or not n else 0", "    offset = int(torch.randint(len(names), ()))", "14_divides"),
 # issue 46: one route a setting, every documented command run
 "stage 2 keeps every label": ("unet.py", "    return keep_confident(labels, confidence, config.confident, dataset.num_classes)", "    return labels", "three_diffusion_models"),
 "samples ignore the solver": ("sample.py", "config.per_class, config.solver, config.steps", "config.per_class, \"heun\", config.steps", "command_writes_a_diffusion or three_diffusion_models"),
 "unet.py ignores --labels-file": ("unet.py", "    labels = training_labels(config, dataset)\n", "    labels = dataset.train_y\n", "unets_commands"),
 "data.py --bench without its strong row": ("data.py", '("strong", strong_augment)', '("weak", strong_augment)', "data_bench"),
 "fid.py --bench without pytorch-fid": ("fid.py", '        candidates["pytorch-fid"] = run_theirs\n', "", "fid_bench"),
 "torchrun samples not gathered": ("sample.py", "    if world > 1 and gather:", "    if False:", "torchrun_train_the_diffusion"),
 "an undocumented command": ("test_dpt.py", 'in_process(*at_test_size("python data.py --bench"))', 'in_process("data.py", "--bench")', "documented_command_is_run"),
 "download without timeout": ("fid.py", "            with download_timeout():\n                state_dict", "            if True:\n                state_dict", "gives_up_after"),
}
names = sys.argv[1:] or list(MUTATIONS)
for name in names:
    path, old, new, tests = MUTATIONS[name]
    src = open(path).read()
    assert src.count(old) == 1, (name, src.count(old))
    open(path, "w").write(src.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--no-header", "-p", "no:cacheprovider", "-k", tests], capture_output=True, text=True)
        last = r.stdout.strip().splitlines()[-1]
        print(f"{name}: {'CAUGHT' if r.returncode else 'MISSED'}: {last}", flush=True)
    finally:
        open(path, "w").write(src)
