"""The configured objective: terms, weights, configuration-time errors, adapters' gradients."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kdflax.distill import attention, losses, manifold, objective

S = jax.ShapeDtypeStruct
B = 2
TEACHER_LAYOUT = {'window_attention': {'stage0_attn': (8, 8, 4, 2)}}


def _shapes(arrays):
  """What `jax.eval_shape` gives for sown intermediates: 1-tuples of ShapeDtypeStructs."""
  return {k: (S(v.shape, v.dtype),) for k, v in arrays.items()}


def _teacher(rng, batch=B):
  attn = jax.nn.softmax(rng.normal(size=(batch * 4, 2, 16, 16)) * 2, axis=-1)
  return {'stage0': rng.normal(size=(batch, 8, 8, 6)).astype(np.float32),
          'stage0_attn': np.asarray(attn, np.float32),
          'stage1': rng.normal(size=(batch, 4, 4, 12)).astype(np.float32)}


def _student(rng, batch=B):
  return {'stage0': rng.normal(size=(batch, 4, 4, 3)).astype(np.float32),
          'stage1': rng.normal(size=(batch, 2, 2, 5)).astype(np.float32)}


def _full_config():
  cfg = objective.default_loss_config()
  cfg.ce.weight, cfg.ce.label_smoothing = 0.5, 0.1
  cfg.kd.weight, cfg.kd.temperature = 2.0, 3.0
  cfg.dkd.weight, cfg.dkd.warmup_steps = 0.3, 10
  cfg.hard.weight = 0.7
  cfg.attention.weight = 10.0
  cfg.attention.pairs = {
      'win': {'teacher': 'stage0_attn', 'student': 'stage0', 'weight': 2.0},
      'act': {'teacher': 'stage1', 'student': 'stage1'},
      'hint': {'teacher': 'stage1', 'student': 'stage1', 'distance': 'feature',
               'adapter': True, 'weight': 0.5},
  }
  cfg.manifold.weight = 1.5
  cfg.manifold.num_samples = 6
  cfg.manifold.pairs = {'m0': {'teacher': 'stage0', 'student': 'stage0'},
                        'm1': {'teacher': 'stage1', 'student': 'stage1', 'weight': 2.0}}
  return cfg


@pytest.fixture
def setup():
  rng = np.random.default_rng(0)
  teacher, student = _teacher(rng), _student(rng)
  obj = objective.Objective(_full_config(), _shapes(teacher), _shapes(student), TEACHER_LAYOUT)
  data = dict(
      student_logits=jnp.asarray(rng.normal(size=(B, 5)), jnp.float32),
      teacher_logits=jnp.asarray(rng.normal(size=(B, 5)), jnp.float32),
      labels=jnp.array([1, 4]),
      student=jax.tree.map(jnp.asarray, student), teacher=jax.tree.map(jnp.asarray, teacher))
  return obj, data


def _apply(obj, params, data, **kw):
  sown = lambda tree: {k: (v,) for k, v in tree.items()}       # as Module.sow stores them
  return obj.apply(params, data['student_logits'], sown(data['student']),
                   data['teacher_logits'], sown(data['teacher']), data['labels'], **kw)


def test_default_config_is_plain_cross_entropy():
  cfg = objective.default_loss_config()
  obj = objective.Objective(cfg, None, None)
  assert obj.init(jax.random.key(0)) == {}
  logits, labels = jnp.array([[1.0, 2.0, 0.5]]), jnp.array([2])
  total, terms = obj.apply({}, logits, {}, None, {}, labels)
  assert set(terms) == {'ce', 'total'}
  np.testing.assert_allclose(total, losses.cross_entropy(logits, labels), rtol=1e-6)


def _reference_terms(params, d, rng):
  """The full config's terms re-assembled from the public loss functions."""
  s, t, y = d['student_logits'], d['teacher_logits'], d['labels']
  want = {
      'ce': 0.5 * losses.cross_entropy(s, y, 0.1),
      'kd': 2.0 * losses.kd_loss(s, t, 3.0),
      'dkd': 0.3 * 0.5 * losses.dkd_loss(s, t, y, 1.0, 8.0, 4.0),
      'hard': 0.7 * losses.hard_distillation_loss(s, t),
  }
  st, te = d['student'], d['teacher']
  win_t = attention.window_attention_map(te['stage0_attn'], (8, 8, 4, 2))
  s0 = attention.activation_map(st['stage0'])
  want['attention/win'] = 10.0 * 2.0 * attention.map_distance(s0, attention.align(win_t, (4, 4)))
  s1 = attention.activation_map(st['stage1'])
  t1 = attention.align(attention.activation_map(te['stage1']), (2, 2))
  want['attention/act'] = 10.0 * attention.map_distance(s1, t1)
  adapted = attention.ChannelAdapter(12).apply({'params': params['hint']}, st['stage1'])
  hint = jnp.mean((adapted - attention.resize_features(te['stage1'], (2, 2))) ** 2)
  want['attention/hint'] = 10.0 * 0.5 * hint
  want['attention'] = want['attention/win'] + want['attention/act'] + want['attention/hint']
  m0 = manifold.manifold_terms(st['stage0'], te['stage0'], jax.random.fold_in(rng, 0), 6)
  m1 = manifold.manifold_terms(st['stage1'], te['stage1'], jax.random.fold_in(rng, 1), 6)
  for name, w in (('intra', 4.0), ('inter', 0.1), ('random', 0.2)):
    want[f'manifold/{name}'] = 1.5 / 2 * w * (m0[name] + 2.0 * m1[name])
  want['manifold'] = sum(want[f'manifold/{n}'] for n in ('intra', 'inter', 'random'))
  want['total'] = sum(want[k] for k in ('ce', 'kd', 'dkd', 'hard', 'attention', 'manifold'))
  return want


def test_every_term_is_its_weighted_loss_and_the_total_their_sum(setup):
  obj, d = setup
  params = obj.init(jax.random.key(1))
  rng = jax.random.key(2)
  total, terms = jax.jit(lambda p: _apply(obj, p, d, step=5, rng=rng))(params)
  want = jax.jit(lambda p: _reference_terms(p, d, rng))(params)
  assert set(terms) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(terms[name], value, rtol=2e-5, err_msg=name)
    assert float(value) > 0, name
  np.testing.assert_allclose(total, want['total'], rtol=2e-5)


def test_attention_maps_are_the_maps_the_loss_compares(setup):
  obj, d = setup
  sown = lambda tree: {k: (v,) for k, v in tree.items()}
  maps = obj.attention_maps(sown(d['student']), sown(d['teacher']))
  assert set(maps) == {'win', 'act'}  # the 'feature' pair has no map
  st, te = d['student'], d['teacher']
  win_t = attention.align(attention.window_attention_map(te['stage0_attn'], (8, 8, 4, 2)),
                          (4, 4))
  np.testing.assert_allclose(maps['win'][1], win_t, rtol=1e-6)
  np.testing.assert_allclose(maps['win'][0], attention.activation_map(st['stage0']), rtol=1e-6)
  _, terms = _apply(obj, obj.init(jax.random.key(1)), d, step=5, rng=jax.random.key(2))
  for name, weight in (('win', 20.0), ('act', 10.0)):
    np.testing.assert_allclose(weight * attention.map_distance(*maps[name]),
                               terms[f'attention/{name}'], rtol=2e-5)


def test_distillation_terms_vanish_when_student_equals_teacher():
  rng = np.random.default_rng(3)
  feats = {'stage0': rng.normal(size=(B, 4, 4, 3)).astype(np.float32),
           'stage1': rng.normal(size=(B, 2, 2, 5)).astype(np.float32)}
  cfg = _full_config()
  cfg.ce.weight, cfg.hard.weight = 0.0, 0.0
  cfg.attention.pairs = {'a0': {'teacher': 'stage0', 'student': 'stage0'},
                         'f1': {'teacher': 'stage1', 'student': 'stage1',
                                'distance': 'feature'}}
  obj = objective.Objective(cfg, _shapes(feats), _shapes(feats))
  assert obj.init(jax.random.key(0)) == {}
  logits = jnp.asarray(rng.normal(size=(B, 5)), jnp.float32)
  feats = jax.tree.map(jnp.asarray, feats)
  _, terms = jax.jit(lambda f: obj.apply({}, logits, f, logits, f, jnp.array([0, 1]), step=20,
                                         rng=jax.random.key(0)))(feats)
  for name, value in terms.items():
    assert abs(float(value)) < 1e-6, name


def test_swin_large_384_stages_pair_onto_mobilenetv3_large_224():
  # Swin-L at 384: grids 96/48/24/12, widths 192..1536, window 12 (shift 6 except the last
  # stage, whose window covers its grid). MobileNetV3-L at 224: 56/28/14/7, widths 24..960.
  heads = (6, 12, 24, 48)
  t_shapes, s_shapes, layout = {}, {}, {}
  for i, (c_t, c_s) in enumerate(zip((192, 384, 768, 1536), (24, 40, 112, 960), strict=True)):
    g_t, g_s = 96 // 2**i, 56 // 2**i
    t_shapes[f'stage{i}'] = (S((B, g_t, g_t, c_t), jnp.float32),)
    t_shapes[f'stage{i}_attn'] = (S((B * (g_t // 12) ** 2, heads[i], 144, 144), jnp.float32),)
    layout[f'stage{i}_attn'] = (g_t, g_t, 12, 0 if i == 3 else 6)
    s_shapes[f'stage{i}'] = (S((B, g_s, g_s, c_s), jnp.float32),)
  cfg = objective.default_loss_config()
  cfg.attention.weight = cfg.manifold.weight = 1.0
  pairs = {}
  for i in range(4):
    pairs[f'attn{i}'] = {'teacher': f'stage{i}_attn', 'student': f'stage{i}'}
    pairs[f'act{i}'] = {'teacher': f'stage{i}', 'student': f'stage{i}'}
    pairs[f'hint{i}'] = {'teacher': f'stage{i}', 'student': f'stage{i}', 'distance': 'feature',
                         'adapter': True}
  cfg.attention.pairs = pairs
  cfg.manifold.pairs = {f'm{i}': {'teacher': f'stage{i}', 'student': f'stage{i}'}
                        for i in range(4)}
  obj = objective.Objective(cfg, t_shapes, s_shapes, {'window_attention': layout})
  for i, (g, c_s, c_t) in enumerate(zip((56, 28, 14, 7), (24, 40, 112, 960),
                                        (192, 384, 768, 1536), strict=True)):
    assert obj.compared_shapes[f'attention/attn{i}'] == ((B, g, g), (B, g, g))
    assert obj.compared_shapes[f'attention/act{i}'] == ((B, g, g), (B, g, g))
    assert obj.compared_shapes[f'attention/hint{i}'] == ((B, g, g, c_t), (B, g, g, c_t))
    assert obj.compared_shapes[f'manifold/m{i}'] == ((B, g * g, c_s), (B, g * g, c_t))
  params = jax.eval_shape(obj.init, jax.random.key(0))
  assert params['hint3']['proj']['kernel'].shape == (960, 1536)
  total, terms = jax.eval_shape(
      lambda p, s, t: obj.apply(p, jnp.zeros((B, 10)), s, jnp.zeros((B, 10)), t,
                                jnp.zeros((B,), jnp.int32), rng=jax.random.key(0)),
      params, s_shapes, t_shapes)
  assert total.shape == () and all(v.shape == () for v in terms.values())
  assert len([k for k in terms if k.startswith('attention/')]) == 12


def _error(cfg_update, match, teacher=None, student=None, layout=TEACHER_LAYOUT, **kw):
  rng = np.random.default_rng(4)
  cfg = objective.default_loss_config()
  cfg_update(cfg)
  teacher = _shapes(_teacher(rng)) if teacher is None else teacher
  student = _shapes(_student(rng)) if student is None else student
  with pytest.raises(ValueError, match=match):
    objective.Objective(cfg, teacher, student, layout, **kw)


def _attention_pair(**pair):
  def update(cfg):
    cfg.attention.weight = 1.0
    cfg.attention.pairs = {'p': {'teacher': 'stage1', 'student': 'stage1', **pair}}
  return update


def test_bad_pairings_fail_at_configuration_time_naming_the_key():
  _error(_attention_pair(teacher='stage9'),
         r"attention\.pairs\.p\.teacher: 'stage9' is not a teacher intermediate; available")
  _error(_attention_pair(student='stage0_attn'),
         r"attention\.pairs\.p\.student: 'stage0_attn' is not a student intermediate")
  _error(_attention_pair(teacher='stage1', teacher_kind='window_attention'),
         r"window attention needs its \(height, width, window, shift\) in "
         r"teacher_layout\.window_attention\['stage1'\]")
  _error(_attention_pair(teacher='stage0_attn'),
         r'windows of 7 x 7 = 49', layout={'window_attention': {'stage0_attn': (8, 8, 7, 0)}})
  _error(_attention_pair(distance='feature'),
         r'feature distance between student width 5 .* teacher width 12 .* needs adapter=True')
  _error(_attention_pair(adapter=True),
         r"attention\.pairs\.p\.adapter applies to distance 'feature' only")
  _error(_attention_pair(teacher='stage0_attn', distance='feature', adapter=True),
         r'window attention, which has no tokens')
  _error(_attention_pair(distance='l1'), r"distance must be one of \('map', 'feature'\)")
  _error(_attention_pair(student_kind='tokens'), r'kind tokens needs \(B, P \+ N, C\)')


def test_token_grids_and_layouts_are_checked_at_configuration_time():
  rng = np.random.default_rng(5)
  vit = {'block0': S((B, 1 + 12, 8), jnp.float32)}                 # 12 patches: no square
  student = _shapes(_student(rng))

  def update(cfg):
    cfg.manifold.weight = 1.0
    cfg.manifold.pairs = {'m': {'teacher': 'block0', 'student': 'stage1'}}

  _error(update, r"manifold\.pairs\.m\.teacher .*after 1 prefix tokens, 12 tokens are not a "
         r"square grid", teacher=vit, student=student, layout={'num_prefix_tokens': 1})
  obj = objective.Objective(_cfg(update), vit, student,
                            {'num_prefix_tokens': 1, 'token_grid': (3, 4)})
  assert obj.compared_shapes['manifold/m'] == ((B, 4, 5), (B, 4, 8))
  _error(update, r"teacher_layout: unknown key\(s\) \['prefix'\]", teacher=vit,
         student=student, layout={'prefix': 1})

  def window_manifold(cfg):
    cfg.manifold.weight = 1.0
    cfg.manifold.pairs = {'m': {'teacher': 'stage0_attn', 'student': 'stage0'}}

  _error(window_manifold, r"manifold\.pairs\.m: 'stage0_attn' is window attention")
  other_batch = _shapes(_student(rng, batch=3))
  _error(_attention_pair(), r'teacher .* has batch 2 but student .* has batch 3',
         student=other_batch)


def _cfg(update):
  cfg = objective.default_loss_config()
  update(cfg)
  return cfg


def test_bad_values_and_keys_fail_at_configuration_time():
  def set_(path, value):
    def update(cfg):
      section, key = path.split('.')
      cfg[section][key] = value
    return update

  _error(set_('kd.temperature', 0.0), r'kd\.temperature must be > 0')
  _error(set_('ce.label_smoothing', 1.0), r'ce\.label_smoothing must be in \[0, 1\)')
  _error(set_('dkd.warmup_steps', -1), r'dkd\.warmup_steps must be an integer >= 0')
  _error(set_('attention.normalize', 'l1'), r"attention\.normalize must be one of")
  _error(set_('manifold.grid', 'max'), r"manifold\.grid must be one of")
  _error(set_('attention.weight', 1.0), r'attention\.weight is 1\.0 but attention\.pairs is '
         r'empty')
  _error(lambda cfg: (setattr(cfg.kd, 'weight', 1.0), setattr(cfg.kd, 'logits', 'dist')),
         r"kd\.logits: 'dist' is neither 'logits' nor a student intermediate")
  _error(lambda cfg: (setattr(cfg.hard, 'weight', 1.0),
                      setattr(cfg.hard, 'distillation_token', True)),
         r"hard\.distillation_token: 'cls_logits' is neither")
  rng = np.random.default_rng(6)
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['temprature'\]"):
    objective.Objective({'kd': {'temprature': 2.0}}, None, None)
  with pytest.raises(ValueError, match=r"unknown term\(s\) \['kdd'\]"):
    objective.Objective({'kdd': {}}, None, None)
  with pytest.raises(ValueError, match=r"pair name 'a/b' must use letters"):
    objective.Objective({'attention': {'weight': 1.0, 'pairs': {
        'a/b': {'teacher': 'stage1', 'student': 'stage1'}}}}, None, None)
  with pytest.raises(ValueError, match=r"pairs\.p: unknown key\(s\) \['wieght'\]"):
    objective.Objective({'attention': {'weight': 1.0, 'pairs': {
        'p': {'teacher': 'stage1', 'student': 'stage1', 'wieght': 2.0}}}},
        _shapes(_teacher(rng)), _shapes(_student(rng)))


def test_call_time_checks_are_plain_python_errors(setup):
  # Raised while tracing, before anything is compiled or run.
  obj, d = setup
  params = obj.init(jax.random.key(0))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='needs the training step'):
    jax.jit(lambda p: _apply(obj, p, d, rng=key))(params)
  with pytest.raises(ValueError, match='rng=key'):
    jax.jit(lambda p: _apply(obj, p, d, step=0))(params)
  bad = dict(d, student={**d['student'], 'stage1': jnp.zeros((B, 3, 3, 5))})
  with pytest.raises(ValueError, match=r"student intermediate 'stage1' has shape \(2, 3, 3, 5\)"):
    jax.jit(lambda p: _apply(obj, p, bad, step=0, rng=key))(params)
  # Only the batch size may change, e.g. for evaluation.
  rng = np.random.default_rng(7)
  small = dict(d, student=jax.tree.map(jnp.asarray, _student(rng, 1)),
               teacher=jax.tree.map(jnp.asarray, _teacher(rng, 1)),
               student_logits=d['student_logits'][:1], teacher_logits=d['teacher_logits'][:1],
               labels=d['labels'][:1])
  total, _ = jax.eval_shape(lambda p: _apply(obj, p, small, step=0, rng=key), params)
  assert total.shape == ()


def test_mask_multi_teacher_and_distillation_token():
  rng = np.random.default_rng(8)
  student = {'cls_logits': rng.normal(size=(3, 4)).astype(np.float32),
             'dist_logits': rng.normal(size=(3, 4)).astype(np.float32)}
  cfg = objective.default_loss_config()
  cfg.ce.weight = 0.0
  cfg.hard.weight, cfg.hard.distillation_token = 1.0, True
  cfg.kd.weight, cfg.kd.logits = 1.0, 'dist_logits'
  obj = objective.Objective(cfg, None, _shapes(student))
  teachers = [jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(2)]
  labels, mask = jnp.array([0, 3, 2]), jnp.array([1.0, 1.0, 0.0])
  s = jax.tree.map(jnp.asarray, student)
  apply = jax.jit(lambda logits, s: obj.apply({}, logits, s, teachers, {}, labels, mask=mask))
  _, terms = apply((s['cls_logits'] + s['dist_logits']) / 2, s)
  hard = jax.jit(losses.deit_distillation_loss)(s['cls_logits'], s['dist_logits'], teachers,
                                                 labels, mask=mask)
  np.testing.assert_allclose(terms['hard'], hard, rtol=1e-6)
  kd = jax.jit(losses.kd_loss, static_argnums=2)(s['dist_logits'], teachers, 4.0, mask)
  np.testing.assert_allclose(terms['kd'], kd, rtol=1e-6)
  changed = {k: v.at[2].set(100.0) for k, v in s.items()}
  _, moved = apply(s['cls_logits'], changed)
  for name in terms:
    np.testing.assert_allclose(moved[name], terms[name], rtol=1e-6, err_msg=name)


def test_jitted_steps_through_objective_and_adapters_decrease_the_loss(setup):
  obj, d = setup
  params = {'adapters': obj.init(jax.random.key(0)),
            'student': dict(d['student'], logits=d['student_logits'])}
  optimizer = optax.adam(3e-2)
  opt_state = optimizer.init(params)

  def loss_fn(p, teacher):
    student = {k: v for k, v in p['student'].items() if k != 'logits'}
    return obj.apply(p['adapters'], p['student']['logits'], student, d['teacher_logits'],
                     teacher, d['labels'], step=10, rng=jax.random.key(3))[0]

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p, d['teacher'])
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss, grads

  first = None
  for _ in range(15):
    params, opt_state, loss, grads = step(params, opt_state)
    first = loss if first is None else first
    assert np.abs(np.asarray(grads['adapters']['hint']['proj']['kernel'])).max() > 0
  last, teacher_grad = jax.jit(jax.value_and_grad(loss_fn, argnums=1))(params, d['teacher'])
  assert float(last) < 0.7 * float(first)
  # The teacher receives no gradient.
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(teacher_grad))


def test_first_last_pairs_and_wrapped_intermediates():
  pairs = objective.first_last_pairs(24, 12)
  assert [(p['teacher'], p['student']) for p in pairs.values()] == [
      ('block0', 'block0'), ('block1', 'block1'), ('block2', 'block2'), ('block3', 'block3'),
      ('block20', 'block8'), ('block21', 'block9'), ('block22', 'block10'),
      ('block23', 'block11')]
  with pytest.raises(ValueError, match='exceeds the depth'):
    objective.first_last_pairs(6, 6)
  cfg = ml_collections.ConfigDict(objective.default_loss_config())
  cfg.manifold.weight = 1.0
  cfg.manifold.pairs = objective.first_last_pairs(2, 2, 1, 1)
  vit = {f'block{i}': (S((B, 2 + 4, 8), jnp.float32),) for i in range(2)}
  obj = objective.Objective(cfg, {'intermediates': vit}, vit, {'num_prefix_tokens': 2},
                            {'num_prefix_tokens': 2})
  assert obj.compared_shapes['manifold/block1'] == ((B, 4, 8), (B, 4, 8))
