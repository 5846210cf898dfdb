"""The batch layer: manifests, the plan of a run, claims, one entry's run, its outputs and record, the
batch's report, dataset augmentation and the operator's settings — plain functions the flows wire together."""
