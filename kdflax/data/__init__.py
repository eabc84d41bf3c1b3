"""kdflax.data: the tf.data input pipeline (sources -> schedules -> transforms -> batches).

    from kdflax.data.config import default_data_config
    from kdflax.data.pipeline import make_datasets

    data = make_datasets(config.data, image_size=224, teacher_image_size=384,
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         seed=config.seed)        # the run's one seed
    train = data.train(start_step=step)      # process-local batches, resumable bit for bit
    for batch in data.eval(): ...            # every example once, 'mask' 0 on padding

Modules: `config` (the `config.data` keys), `sources` (image folders, TFDS), `records` (a
split's example table), `plan` (pure NumPy schedules: order, shards, substitutes, mixing),
`transforms` and `randaugment` (TF image ops), `image_table` (a split's images by row in
tf.data), `iterators` (NumPy batches, corrupt-image bookkeeping), `pipeline` (tf.data graphs,
`make_datasets`), `sanity` (checks at start), `eval_view` and `photos` (the served pixels),
`bench` (throughput). Importing this package imports nothing heavy.
"""
