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
    return slurm.SUCCESS
end

function slurm_cli_post_submit(offset, job_id, step_id)
    return slurm.SUCCESS
end
