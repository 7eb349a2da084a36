//! MCP on the gateway: `/mcp` (Streamable HTTP, JSON-RPC 2.0), served by the official
//! Rust SDK (`rmcp`) inside the gateway's own HTTP server, behind the same bearer token as
//! the task API.
//!
//! - Tools are the flows: `tools/list` shows every flow with its `description` and
//!   `input_schema` from the flow file ([`FlowDoc`]); a flow without them is listed with a
//!   generated description and `{"type": "object"}`.
//! - `tools/call` submits a task (the arguments are its payload), sends
//!   `notifications/progress` from the task's hop reports when the client gave a progress
//!   token, and answers with the task's result when it finishes within the wait bound
//!   ([`McpOptions::wait`], `ASYA_GATEWAY_MCP_WAIT`). A failed task is a tool result with
//!   `isError: true` and the error message; a canceled one too.
//! - Past the bound, a client that declared the tasks extension
//!   (`io.modelcontextprotocol/tasks`, SEP-2663) gets the task form: `resultType: "task"`
//!   with the task id (the gateway's task id) and status, then `tasks/get` (status, and the
//!   tool result inline once completed) and `tasks/cancel` ([`Gateway::cancel`]). A client
//!   without the extension is answered when the task ends.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, ContentBlock,
    CreateTaskResult, DetailedTask, GetTaskParams, GetTaskResult, Implementation, JsonObject,
    ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities,
    ServerConfig, Task as McpTask, TaskPayload, TaskStatus as McpStatus, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Gateway, GatewayError, SubmitRequest, TaskStatus, TaskView};

/// Default of `ASYA_GATEWAY_MCP_WAIT`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);
/// `pollIntervalMs` suggested to task-form clients.
const POLL_INTERVAL_MS: u64 = 500;

/// What the flow file says about a flow for MCP clients (`[flows.NAME]` keys
/// `description` and `input_schema`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlowDoc {
    pub description: Option<String>,
    /// A JSON Schema object (`type = "object"`) for the tool's arguments = the payload.
    pub input_schema: Option<JsonObject>,
}

/// Flow name → its MCP description.
pub type FlowDocs = BTreeMap<String, FlowDoc>;

/// How `/mcp` serves.
#[derive(Debug, Clone)]
pub struct McpOptions {
    /// How long `tools/call` waits for the task before answering with the task form
    /// (`ASYA_GATEWAY_MCP_WAIT`).
    pub wait: Duration,
    /// Descriptions and input schemas of the flows.
    pub docs: Arc<FlowDocs>,
    /// How long the store keeps a task after its last update (`ASYA_GATEWAY_RETENTION`):
    /// the tasks' `ttlMs` is their age at the last update plus this.
    pub retention: Duration,
}

impl Default for McpOptions {
    fn default() -> Self {
        McpOptions {
            wait: DEFAULT_WAIT,
            docs: Arc::new(FlowDocs::new()),
            retention: super::store::DEFAULT_RETENTION,
        }
    }
}

/// Check a flow's `input_schema` (as JSON) and make it a tool input schema.
pub fn check_input_schema(flow: &str, v: Value) -> Result<JsonObject, String> {
    let Value::Object(o) = v else {
        return Err(format!(
            "flow {flow}: input_schema must be a table (a JSON Schema object)"
        ));
    };
    match o.get("type") {
        Some(Value::String(t)) if t == "object" => {}
        _ => {
            return Err(format!(
            "flow {flow}: input_schema must have type = \"object\" (tool arguments are an object)"
        ))
        }
    }
    compile(&o).map_err(|e| format!("flow {flow}: input_schema is {e}"))?;
    Ok(o)
}

/// The `description` and `input_schema` of the `[flows]` table of TOML text (the table form
/// `[flows.NAME]`; the list form has neither).
pub fn parse_flow_docs(text: &str) -> Result<FlowDocs, String> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        flows: BTreeMap<String, toml::Value>,
    }
    let file: File = toml::from_str(text).map_err(|e| e.to_string().replace('\n', " "))?;
    let mut docs = FlowDocs::new();
    for (name, v) in file.flows {
        let toml::Value::Table(t) = v else { continue };
        let description = match t.get("description") {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(format!("flow {name}: description must be a string")),
        };
        let input_schema = match t.get("input_schema") {
            None => None,
            Some(s) => {
                let v = serde_json::to_value(s).map_err(|e| format!("flow {name}: {e}"))?;
                Some(check_input_schema(&name, v)?)
            }
        };
        if description.is_some() || input_schema.is_some() {
            docs.insert(
                name,
                FlowDoc {
                    description,
                    input_schema,
                },
            );
        }
    }
    Ok(docs)
}

/// [`parse_flow_docs`] of a flow file.
pub fn load_flow_docs(path: &std::path::Path) -> Result<FlowDocs, super::FlowsError> {
    let text = std::fs::read_to_string(path).map_err(|source| super::FlowsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_flow_docs(&text).map_err(|message| super::FlowsError::Invalid {
        path: path.display().to_string(),
        message,
    })
}

/// Why the arguments do not fit the schema (validated by the `jsonschema` crate: every
/// keyword of the schema's draft, `$ref` within the schema; no remote references): the first
/// error, with where it is.
pub fn check_arguments(schema: &JsonObject, args: &JsonObject) -> Result<(), String> {
    let validator = compile(schema)?;
    let args = Value::Object(args.clone());
    let first = validator.iter_errors(&args).next().map(|e| {
        let at = e.instance_path().to_string();
        if at.is_empty() {
            e.to_string()
        } else {
            format!("{at}: {e}")
        }
    });
    first.map_or(Ok(()), Err)
}

/// The validator of a flow's input schema.
fn compile(schema: &JsonObject) -> Result<jsonschema::Validator, String> {
    jsonschema::validator_for(&Value::Object(schema.clone()))
        .map_err(|e| format!("not a valid JSON Schema: {e}"))
}

/// The tools: one per flow.
pub fn tools(gw: &Gateway, docs: &FlowDocs) -> Vec<Tool> {
    gw.flows()
        .iter()
        .map(|(name, actors)| tool(name, actors, docs.get(name)))
        .collect()
}

fn tool(name: &str, actors: &[String], doc: Option<&FlowDoc>) -> Tool {
    let description = doc
        .and_then(|d| d.description.clone())
        .unwrap_or_else(|| format!("Runs the flow {name} ({}).", actors.join(" -> ")));
    let schema = doc
        .and_then(|d| d.input_schema.clone())
        .unwrap_or_else(|| JsonObject::from_iter([("type".to_owned(), json!("object"))]));
    Tool::new(name.to_owned(), description, Arc::new(schema))
}

/// The MCP server of one gateway.
#[derive(Clone)]
struct Handler {
    gw: Arc<Gateway>,
    opts: McpOptions,
    /// The gateway's shutdown: it cancels every request too, but not their tasks.
    shutdown: CancellationToken,
}

fn text_result(text: String, is_error: bool) -> CallToolResult {
    if is_error {
        CallToolResult::error(vec![ContentBlock::text(text)])
    } else {
        CallToolResult::success(vec![ContentBlock::text(text)])
    }
}

/// The tool result of a finished task: its result (text + structured content) when it
/// succeeded, `isError` with the error otherwise.
fn tool_result(v: &TaskView) -> CallToolResult {
    match v.status {
        TaskStatus::Succeeded => {
            let result = v.result.clone().unwrap_or(Value::Null);
            let mut r = text_result(result.to_string(), false);
            // Structured content is an object: the result itself, or {"result": ...}.
            r.structured_content = Some(match result {
                Value::Object(_) => result,
                other => json!({ "result": other }),
            });
            r
        }
        TaskStatus::Canceled => text_result(format!("task {} was canceled", v.id), true),
        _ => {
            let msg = match &v.error {
                Some(e) if !e.kind.is_empty() => format!("{}: {}", e.kind, e.message),
                Some(e) => e.message.clone(),
                None => format!("task {} {}", v.id, v.status.as_str()),
            };
            text_result(msg, true)
        }
    }
}

fn status_message(v: &TaskView) -> String {
    let at = v
        .current_actor_name
        .as_deref()
        .map(|a| format!(" at {a}"))
        .unwrap_or_default();
    format!(
        "{}{at} ({}/{} actors)",
        v.status.as_str(),
        v.actors_completed,
        v.total_actors
    )
}

/// The MCP task of a gateway task; it is kept `retention` after its last update.
fn mcp_task(v: &TaskView, retention: Duration) -> DetailedTask {
    let age = match (
        chrono::DateTime::parse_from_rfc3339(&v.created_at),
        chrono::DateTime::parse_from_rfc3339(&v.updated_at),
    ) {
        (Ok(c), Ok(u)) => (u - c).to_std().unwrap_or_default(),
        _ => Duration::ZERO,
    };
    let ttl = u64::try_from((age + retention).as_millis()).unwrap_or(u64::MAX);
    let task = McpTask::new(
        v.id.clone(),
        McpStatus::Working,
        v.created_at.clone(),
        v.updated_at.clone(),
    )
    .with_status_message(status_message(v))
    .with_ttl_ms(ttl)
    .with_poll_interval_ms(POLL_INTERVAL_MS);
    let payload = match v.status {
        TaskStatus::Pending | TaskStatus::Running | TaskStatus::Paused => TaskPayload::Working,
        TaskStatus::Canceled => TaskPayload::Cancelled,
        TaskStatus::Succeeded | TaskStatus::Failed => {
            let result = match serde_json::to_value(tool_result(v)) {
                Ok(Value::Object(o)) => o,
                _ => JsonObject::new(),
            };
            // A failed flow is a tool result with isError (SEP-2663: `completed`), not a
            // JSON-RPC error.
            TaskPayload::Completed { result }
        }
    };
    DetailedTask::new(task, payload)
}

fn gateway_error(e: GatewayError) -> Result<CallToolResponse, McpError> {
    match e {
        GatewayError::BadRequest(_) | GatewayError::PayloadTooLarge { .. } => {
            Ok(text_result(e.to_string(), true).into())
        }
        GatewayError::UnknownFlow(_) => Err(McpError::invalid_params(e.to_string(), None)),
        other => Err(McpError::internal_error(other.to_string(), None)),
    }
}

impl Handler {
    /// Wait for the task to be final, sending progress; `None` when `until` passed first.
    async fn wait(
        &self,
        id: &str,
        mut rx: broadcast::Receiver<Arc<super::TaskEvent>>,
        until: Option<tokio::time::Instant>,
        ctx: &RequestContext<RoleServer>,
    ) -> Option<TaskView> {
        let token = ctx.meta.get_progress_token();
        let mut sent = 0u32;
        loop {
            if let Some(v) = self.gw.get(id).await {
                if v.status.is_final() {
                    return Some(v);
                }
            }
            let next = async {
                loop {
                    match rx.recv().await {
                        Ok(ev) if ev.task_id == id => return Some(ev),
                        Ok(_) => {}
                        // Lagged: re-read the task; closed: the gateway is going away.
                        Err(broadcast::error::RecvError::Lagged(_)) => return None,
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            };
            // Also re-read now and then (reports applied by another gateway sharing the
            // store do not reach this one's events).
            let bound = tokio::time::Instant::now() + Duration::from_millis(500);
            let bound = until.map_or(bound, |u| u.min(bound));
            tokio::select! {
                _ = ctx.ct.cancelled() => return None,
                r = tokio::time::timeout_at(bound, next) => {
                    if let Ok(Some(ev)) = r {
                        if let (Some(token), Ok(v)) =
                            (&token, serde_json::from_value::<TaskView>(ev.data.clone()))
                        {
                            sent += 1;
                            let p = ProgressNotificationParam::new(token.clone(), f64::from(sent))
                                .with_message(status_message(&v));
                            if let Err(e) = ctx.peer.notify_progress(p).await {
                                debug!(task_id = %id, error = %e, "MCP progress not sent");
                            }
                        }
                    }
                }
            }
            if until.is_some_and(|u| tokio::time::Instant::now() >= u) {
                return None;
            }
        }
    }
}

impl ServerHandler for Handler {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tasks()
                .build(),
        )
        .with_server_info(Implementation::new(
            "asya-gateway",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(
            "Each tool runs one flow of actors; its arguments are the task's payload. \
             Long tasks answer with a task (tasks/get, tasks/cancel) when the client \
             declared the tasks extension.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(tools(
            &self.gw,
            &self.opts.docs,
        )))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        let actors = self.gw.flows().get(name)?;
        Some(tool(name, actors, self.opts.docs.get(name)))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let flow = request.name.to_string();
        if !self.gw.flows().contains_key(&flow) {
            let known: Vec<&str> = self.gw.flows().keys().map(String::as_str).collect();
            return Err(McpError::invalid_params(
                format!("unknown tool {flow:?} (tools: {})", known.join(", ")),
                None,
            ));
        }
        let args = request.arguments.unwrap_or_default();
        if let Some(schema) = self
            .opts
            .docs
            .get(&flow)
            .and_then(|d| d.input_schema.as_ref())
        {
            if let Err(why) = check_arguments(schema, &args) {
                return Ok(text_result(format!("invalid arguments: {why}"), true).into());
            }
        }
        // Subscribe before submitting: no event falls between.
        let rx = self.gw.subscribe();
        let view = match self
            .gw
            .submit(SubmitRequest {
                flow: Some(flow.clone()),
                payload: Value::Object(args),
                ..SubmitRequest::default()
            })
            .await
        {
            Ok(v) => v,
            Err(e) => return gateway_error(e),
        };
        let tasks = context
            .client_capabilities()
            .is_some_and(|c| c.supports_tasks());
        let until = tasks.then(|| tokio::time::Instant::now() + self.opts.wait);
        match self.wait(&view.id, rx, until, &context).await {
            Some(done) => Ok(tool_result(&done).into()),
            None if self.shutdown.is_cancelled() => Err(McpError::internal_error(
                format!("the gateway is shutting down; task {} goes on", view.id),
                None,
            )),
            None if context.ct.is_cancelled() => {
                // The client gave up on the call (cancelled it, or went away before the
                // task form was given): the task goes with it.
                let _ = self.gw.cancel(&view.id).await;
                Err(McpError::internal_error("request cancelled", None))
            }
            None => {
                let now = self.gw.get(&view.id).await.unwrap_or(view);
                debug!(task_id = %now.id, flow = %flow, "MCP tool call continues as a task");
                Ok(CallToolResponse::Task(CreateTaskResult::new(
                    mcp_task(&now, self.opts.retention).task,
                )))
            }
        }
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, McpError> {
        match self.gw.get(&request.task_id).await {
            Some(v) => Ok(GetTaskResult::new(mcp_task(&v, self.opts.retention))),
            None => Err(McpError::invalid_params(
                self.gw.not_found(&request.task_id).to_string(),
                None,
            )),
        }
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        match self.gw.cancel(&request.task_id).await {
            Ok(_) => Ok(()),
            Err(e @ GatewayError::NotFound { .. }) => {
                Err(McpError::invalid_params(e.to_string(), None))
            }
            Err(e) => Err(McpError::internal_error(e.to_string(), None)),
        }
    }
}

/// The `/mcp` endpoint of one gateway (a tower service of the SDK, called per request).
#[derive(Clone)]
pub(super) struct Endpoint {
    svc: StreamableHttpService<Handler, NeverSessionManager>,
}

impl Endpoint {
    pub(super) fn new(
        gw: Arc<Gateway>,
        opts: McpOptions,
        max_body: usize,
        shutdown: CancellationToken,
    ) -> Endpoint {
        let handler = Handler {
            gw,
            opts,
            shutdown: shutdown.clone(),
        };
        // Stateless (no sessions: every request stands alone, as 2026-07-28 has it); SSE
        // answers so progress can stream; any Host (the bearer token guards the gateway,
        // which is served beyond loopback as the task API is).
        let config = StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .disable_allowed_hosts()
            .with_max_request_body_bytes(max_body)
            .with_cancellation_token(shutdown);
        Endpoint {
            svc: StreamableHttpService::new(
                move || Ok(handler.clone()),
                Arc::new(NeverSessionManager::default()),
                config,
            ),
        }
    }

    pub(super) async fn handle(
        &self,
        req: hyper::Request<Full<Bytes>>,
    ) -> hyper::Response<UnsyncBoxBody<Bytes, Infallible>> {
        self.svc.handle(req).await.map(BodyExt::boxed_unsync)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> JsonObject {
        match v {
            Value::Object(o) => o,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn flow_docs_from_the_table_form() {
        let docs = parse_flow_docs(
            r#"
[flows]
plain = ["a"]

[flows.rich]
actors = ["a", "b"]
description = "Does things."
input_schema = { type = "object", required = ["text"], properties = { text = { type = "string" } } }

[flows.bare]
actors = ["a"]
"#,
        )
        .unwrap();
        assert_eq!(docs.len(), 1, "{docs:?}");
        let rich = &docs["rich"];
        assert_eq!(rich.description.as_deref(), Some("Does things."));
        let schema = rich.input_schema.as_ref().unwrap();
        assert_eq!(schema["required"], json!(["text"]));
        assert_eq!(schema["properties"]["text"]["type"], "string");
    }

    #[test]
    fn bad_schemas_are_named() {
        for (text, want) in [
            (
                "[flows.f]\nactors = [\"a\"]\ninput_schema = \"{}\"",
                "must be a table",
            ),
            (
                "[flows.f]\nactors = [\"a\"]\ninput_schema = { type = \"string\" }",
                "type = \"object\"",
            ),
            (
                "[flows.f]\nactors = [\"a\"]\ninput_schema = { type = \"object\", required = \"x\" }",
                "input_schema is not a valid JSON Schema",
            ),
            ("[flows.f]\nactors = [\"a\"]\ndescription = 3", "description must be a string"),
        ] {
            let e = parse_flow_docs(text).unwrap_err();
            assert!(e.contains("flow f") && e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn arguments_checked_against_the_schema() {
        let schema = obj(json!({
            "type": "object",
            "required": ["text"],
            "additionalProperties": false,
            "properties": {
                "text": {"type": "string"},
                "rating": {"type": "integer"},
                "score": {"type": ["number", "null"]},
                "mode": {"enum": ["a", "b"]},
            }
        }));
        let ok = |v: Value| check_arguments(&schema, &obj(v));
        ok(json!({"text": "x", "rating": 3, "score": null, "mode": "a"})).unwrap();
        ok(json!({"text": "x", "score": 1.5})).unwrap();
        let err = |v: Value| ok(v).unwrap_err();
        assert!(err(json!({"rating": 3})).contains("\"text\" is a required property"));
        let e = err(json!({"text": 1}));
        assert!(e.contains("/text") && e.contains("\"string\""), "{e}");
        let e = err(json!({"text": "x", "rating": 1.5}));
        assert!(e.contains("/rating") && e.contains("integer"), "{e}");
        let e = err(json!({"text": "x", "mode": "c"}));
        assert!(e.contains("/mode") && e.contains("one of"), "{e}");
        assert!(err(json!({"text": "x", "other": 1})).contains("'other' was unexpected"));
        // Keywords beyond the flat ones: nested objects, string bounds.
        let nested = obj(
            json!({"type": "object", "properties": {"item": {"type": "object",
            "required": ["sku"], "properties": {"sku": {"type": "string", "minLength": 3}}}}}),
        );
        let e = check_arguments(&nested, &obj(json!({"item": {"sku": "ab"}}))).unwrap_err();
        assert!(e.contains("/item/sku"), "{e}");
    }

    fn view(status: TaskStatus) -> TaskView {
        TaskView {
            id: "t1".into(),
            status,
            current_actor_name: Some("b".into()),
            actors_completed: 1,
            total_actors: 2,
            result: None,
            error: None,
            created_at: "2026-01-01T00:00:00.000Z".into(),
            updated_at: "2026-01-01T00:00:01.000Z".into(),
            trace_id: "x".into(),
            flow: Some("f".into()),
            deadline_at: None,
            pause_metadata: None,
        }
    }

    #[test]
    fn task_states_map_to_mcp() {
        let day = Duration::from_secs(24 * 3600);
        let t = serde_json::to_value(mcp_task(&view(TaskStatus::Running), day)).unwrap();
        assert_eq!(t["status"], "working");
        // Kept a day after its last update, one second after its creation.
        assert_eq!(t["ttlMs"], 24 * 3600 * 1000 + 1000);
        assert_eq!(t["taskId"], "t1");
        assert_eq!(t["statusMessage"], "running at b (1/2 actors)");
        let t = serde_json::to_value(mcp_task(&view(TaskStatus::Canceled), day)).unwrap();
        assert_eq!(t["status"], "cancelled");

        let mut ok = view(TaskStatus::Succeeded);
        ok.result = Some(json!([1, 2]));
        let t = serde_json::to_value(mcp_task(&ok, day)).unwrap();
        assert_eq!(t["status"], "completed");
        assert_eq!(t["result"]["isError"], false);
        assert_eq!(t["result"]["structuredContent"], json!({"result": [1, 2]}));
        assert_eq!(t["result"]["content"][0]["text"], "[1,2]");

        let mut failed = view(TaskStatus::Failed);
        failed.error = Some(crate::envelope::ErrorInfo::new("ValueError", "no text"));
        let t = serde_json::to_value(mcp_task(&failed, day)).unwrap();
        assert_eq!(t["status"], "completed");
        assert_eq!(t["result"]["isError"], true);
        assert_eq!(t["result"]["content"][0]["text"], "ValueError: no text");
    }
}
