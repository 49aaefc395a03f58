"""Tasks, scenarios and TaskEnv on real robosuite: observation contract, determinism, what each scenario changes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import envs
from apo_ray.errors import UserError
from envs.oracle import make_oracle


def _oracle_steps(env: envs.TaskEnv, seed: int, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    obs = env.reset(seed)
    oracle = make_oracle(env.task.name)
    states, images = [env.get_state()], [obs.get("image")]
    for _ in range(n):
        obs, *_ = env.step(oracle.act(obs["privileged"]))
        states.append(env.get_state())
        images.append(obs.get("image"))
    return states, images


@pytest.fixture(scope="module")
def lift_cam():
    env = envs.TaskEnv("lift", image_size=64)
    yield env
    env.close()


def test_registry_and_scenario_parsing():
    assert set(envs.TASKS) == {"lift", "can", "square", "stack"}
    assert {"nominal", "position", "background", "texture", "distractor", "physics", "push"} <= set(envs.SCENARIOS)
    assert envs.parse_scenario("position+texture") == ("position", "texture")
    assert envs.parse_scenario("nominal") == ("nominal",)
    with pytest.raises(UserError, match="did you mean 'position'"):
        envs.parse_scenario("positon")
    with pytest.raises(UserError, match="did you mean 'texture'"):
        envs.parse_scenario("position+textur")
    with pytest.raises(UserError, match="unknown task"):
        envs.TaskEnv("lfit")
    both = envs.compose("position+texture")
    assert both.object_region == envs.SCENARIOS["position"].object_region
    assert both.object_texture == envs.SCENARIOS["texture"].object_texture


def test_observation_contract(lift_cam):
    obs = lift_cam.reset(0)
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["proprio"].shape == (9,) and obs["proprio"].dtype == np.float32
    priv = obs["privileged"]
    assert all(isinstance(v, np.ndarray) for v in priv.values())
    np.testing.assert_allclose(obs["proprio"][:3], priv["eef_pos"], atol=1e-6)
    # robosuite renders bottom-up; the env flips it upright
    raw = lift_cam.env.sim.render(camera_name="agentview", width=64, height=64)
    np.testing.assert_array_equal(obs["image"], raw[::-1])
    assert lift_cam.instruction and lift_cam.horizon == envs.TASKS["lift"].horizon
    assert lift_cam.env_meta["env_name"] == "Lift" and lift_cam.env_meta["env_kwargs"]["hard_reset"] is False
    assert lift_cam.get_state().ndim == 1
    # cheap render survives resets (hard_reset=False keeps the sim and its GL context)
    import mujoco

    lift_cam.reset(1)
    ctx = lift_cam.env.sim._render_context_offscreen
    assert ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] == 0 and ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] == 0
    assert (ctx.con.offWidth, ctx.con.offHeight) == (64, 64) and lift_cam.env.sim.model.vis.quality.offsamples == 0
    _, _, done, info = lift_cam.step(np.zeros(7))
    assert done is False and info == {"success": False}


def test_wrist_view_sits_beside_an_unchanged_agentview(lift_cam):
    wrist = envs.TaskEnv("lift", image_size=64, wrist=True)
    try:
        _, both = _oracle_steps(wrist, 3, 6)
        _, alone = _oracle_steps(lift_cam, 3, 6)
        assert both[0].shape == (64, 128, 3) and both[0].dtype == np.uint8
        for b, a in zip(both, alone, strict=True):
            np.testing.assert_array_equal(b[:, :64], a)  # the second camera changes nothing in the first
        first = wrist.reset(3)["image"]  # at reset the observation is rendered at the current state
        raw = wrist.env.sim.render(camera_name="robot0_eye_in_hand", width=64, height=64)
        np.testing.assert_array_equal(first[:, 64:], raw[::-1])
        assert not np.array_equal(both[0][:, 64:], both[-1][:, 64:])  # it moves with the gripper
        assert wrist.env_meta["env_kwargs"]["camera_names"] == ["agentview", "robot0_eye_in_hand"]
    finally:
        wrist.close()


def test_determinism_same_seed_same_episode(lift_cam):
    s1, i1 = _oracle_steps(lift_cam, 3, 12)
    _oracle_steps(lift_cam, 4, 5)  # another episode in between must not leak into the next
    s2, i2 = _oracle_steps(lift_cam, 3, 12)
    for a, b in zip(s1, s2, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(i1, i2, strict=True):
        np.testing.assert_array_equal(a, b)
    s3, _ = _oracle_steps(lift_cam, 5, 0)
    assert not np.array_equal(s1[0], s3[0])


def test_determinism_across_env_instances():
    a = envs.TaskEnv("stack", "physics+push", camera=False)
    b = envs.TaskEnv("stack", "physics+push", camera=False)
    try:
        sa, _ = _oracle_steps(a, 7, 40)
        sb, _ = _oracle_steps(b, 7, 40)
        np.testing.assert_array_equal(np.stack(sa), np.stack(sb))
    finally:
        a.close()
        b.close()


def test_position_shifts_object_and_fixture():
    env = envs.TaskEnv("lift", "position", camera=False)
    try:
        xs = [env.reset(s)["privileged"]["object_pos"][0] for s in range(4)]
    finally:
        env.close()
    assert all(0.08 <= x <= 0.12 for x in xs), xs  # nominal draws x in [-0.03, 0.03]
    env = envs.TaskEnv("square", "position", camera=False)
    try:
        pegs = [env.reset(s)["privileged"]["target_pos"][:2] for s in range(3)]
    finally:
        env.close()
    assert all(not np.allclose(p, [0.23, 0.10]) for p in pegs)
    assert not np.allclose(pegs[0], pegs[1])


def test_visual_scenarios_change_what_they_claim(lift_cam):
    nominal = lift_cam.reset(0)["image"].astype(int)
    model0 = lift_cam.env.sim.model
    cube = model0.geom_name2id("cube_g0_vis")
    table = model0.geom_name2id("table_visual")
    for name, geom in (("texture", cube), ("background", table), ("distractor", None)):
        env = envs.TaskEnv("lift", name, image_size=64)
        try:
            img = env.reset(0)["image"].astype(int)
            model = env.env.sim.model
            changed = (np.abs(img - nominal).sum(-1) > 60).sum()
            assert changed >= 6, (name, changed)  # visible in the 64 px image
            if geom is not None:
                assert not np.allclose(model.geom_rgba[geom], model0.geom_rgba[geom]) or \
                    model.geom_matid[geom] != model0.geom_matid[geom], name
            else:
                joints = [model.joint_name2id(f"distractor{i}_joint0") for i in range(3)]
                xy = np.array([env.env.sim.data.qpos[model.jnt_qposadr[j]:model.jnt_qposadr[j] + 2] for j in joints])
                cube_xy = env.reset(0)["privileged"]["object_pos"][:2]
                assert np.all(np.linalg.norm(xy - cube_xy, axis=1) > 0.08)
        finally:
            env.close()


def test_physics_and_push_and_composition():
    env = envs.TaskEnv("lift", "physics", camera=False)
    try:
        body = env.env.sim.model.body_name2id("cube_main")
        masses = []
        for s in range(3):
            env.reset(s)
            masses.append(float(env.env.sim.model.body_mass[body]))
    finally:
        env.close()
    assert len(set(masses)) == 3
    moved = {}
    for name in ("nominal", "push", "position+push"):
        env = envs.TaskEnv("lift", name, camera=False)
        try:
            start = env.reset(1)["privileged"]["object_pos"].copy()
            for _ in range(40):
                obs, *_ = env.step(np.zeros(7))
            moved[name] = float(np.linalg.norm(obs["privileged"]["object_pos"][:2] - start[:2]))
            if name == "position+push":
                assert 0.08 <= start[0] <= 0.12
        finally:
            env.close()
    assert moved["nominal"] < 1e-3 and moved["push"] > 0.01 and moved["position+push"] > 0.01, moved


def test_cli_lists_tasks_and_scenarios(capsys):
    from apo_ray.cli import main

    assert main(["tasks", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in info["tasks"]] == list(envs.TASKS)
    assert {s["name"] for s in info["scenarios"]} == set(envs.SCENARIOS)
    assert main(["tasks"]) == 0 and "position+texture" in capsys.readouterr().out
