--[[
slurm_mm cli_filter: make enrolled jobs hear preemption at grace start and keep their
output across a requeue. Install as cli_filter.lua beside slurm.conf with
CliFilterPlugins=cli_filter/lua.

For a job submitted with --checkpoint-interval (other than off):
  * --signal=B:USR1@60 unless the user chose a --signal: with
    SlurmctldParameters=preempt_send_user_signal (22.05) or
    PreemptParameters=send_user_signal (23.02+) the batch step then gets SIGUSR1 when
    the job is selected for preemption, and slurm_mm checkpoints at once. Without it the
    node agent still notices the preemption by polling, a little later.
  * --open-mode=append: a requeued job's output file is otherwise truncated.
The SPANK option is visible here only through slurm.json_cli_options (FACTS.md).
]]

local function enrolled(options)
    local json = slurm.json_cli_options(options)
    local value = string.match(json, '"spank:checkpoint%-interval"%s*:%s*"([^"]*)"')
    return value ~= nil and value ~= "" and string.lower(value) ~= "off" and value ~= "0"
end

-- Site setting: an enrolled job that asks for more than one node gets no images
-- (slurm_mm checkpoints single-node jobs only). "warn": submit it with a warning;
-- "error": refuse the submission.
local MULTINODE_POLICY = "warn"

-- The smallest node count the job asked for (-N MIN[-MAX]); 1 when it did not say.
local function min_nodes(options)
    local nodes = options["nodes"]
    if nodes == nil or nodes == "" then
        return 1
    end
    return tonumber(string.match(nodes, "^(%d+)")) or 1
end

-- One line at submit time for what the node agent would tell the job anyway.
local function check_multinode(options)
    local n = min_nodes(options)
    if n <= 1 then
        return slurm.SUCCESS
    end
    local text = "--checkpoint-interval: this job asks for " .. n .. " nodes and slurm_mm " ..
        "checkpoints single-node jobs only: it will get no images, and preemption, drains " ..
        "and node failures will rerun it from the start"
    if MULTINODE_POLICY == "error" then
        slurm.log_error("%s (refused by this site's slurm_mm policy)", text)
        return slurm.ERROR
    end
    slurm.log_info("warning: %s", text)
    return slurm.SUCCESS
end

function slurm_cli_setup_defaults(options, early_pass)
    return slurm.SUCCESS
end

function slurm_cli_pre_submit(options, pack_offset)
    if not enrolled(options) then
        return slurm.SUCCESS
    end
    if options["signal"] == nil or options["signal"] == "" then
        options["signal"] = "B:USR1@60"
    end
    if options["open-mode"] == nil or options["open-mode"] == "" then
        options["open-mode"] = "append"
    end
    return check_multinode(options)
end

function slurm_cli_post_submit(offset, job_id, step_id)
    return slurm.SUCCESS
end
