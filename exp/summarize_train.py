import json,os,sys
keys=sys.argv[1].split(",") if len(sys.argv)>1 else ["tokens_per_step","step_s","tokens_per_s","bound_s","bound_term","step_over_bound","gpu_compute_s","disk_s","resident_step_s","tiered_again_step_s","tiered_vs_resident","tiered_vs_resident_first_run","max_gpu_bytes","rss_bytes","wait_for_experts_s"]
for line in open(os.environ["OUT"]+"/train.jsonl"):
    d=json.loads(line)
    for r in d["r"]:
        print(d["run"], r["config"], {k: (round(r[k],4) if isinstance(r.get(k),float) else r.get(k)) for k in keys})
