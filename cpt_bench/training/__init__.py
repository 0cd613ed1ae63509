"""Training: the method contract every plugin implements (`plugin`, with the event states of `stage`), the one
shared DAP trainer with its named events (`trainer`), the optimizer and schedules (`optim`), checkpoints and
resume (`checkpoint`), the layers that adapter methods add (`adapters`) and the MLM-head warm-up
(`head_warmup`). Plugins (methods/, baselines/) import from here and the layers below."""
