"""The shared fixtures build what production builds."""


def test_make_trainer_passes_every_trainer_section_of_the_config(make_trainer):
    # mtrl.run.build_trainer hands the trainer the sampler, rollout and dynamic_sampling
    # sections; a fixture that dropped one would test a trainer production never builds.
    trainer = make_trainer(
        "dynamic_sampling.enabled=true",
        "dynamic_sampling.max_rounds=2",
        "rollout.engine=hf",
        "sampler.high_temperature=1.7",
    )
    assert trainer.dynamic_sampling.enabled and trainer.dynamic_sampling.max_rounds == 2
    assert trainer.rollout_config.engine == "hf"
    assert trainer.sampler.config.high_temperature == 1.7
