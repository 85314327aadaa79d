//! `gpdp serve`: the TRE boundary as an Arrow Flight SQL service.
//!
//! Researchers' own tools (Python with ADBC, DBeaver and other JDBC
//! clients) speak Flight SQL; this service answers them through exactly the
//! same code as `gpdp query`: [`crate::tre::query`] runs every statement
//! (views with the opt-out filters, plan guard, disclosure control, audit),
//! and [`crate::tre::describe`] answers every schema-only request with the
//! same guard, so a `GetFlightInfo` reveals nothing the query could not.
//!
//! Authentication (every call; a missing or wrong credential is
//! `Unauthenticated`, and the attempt is audited):
//! - the Basic handshake, with user name `USER@PROJECT` and the researcher's
//!   token as the password, returns a session bearer token for that
//!   researcher and project (what ADBC's and JDBC's user/password options do);
//! - or a researcher token as `authorization: Bearer TOKEN`, with the project
//!   in the `x-gpdp-project` header.
//!
//! Tokens are compared as SHA-256 digests in constant time; session tokens
//! are random, kept only in memory and looked up by their digest. The
//! service listens on loopback; another address needs `--allow-remote` and
//! TLS (`--tls-cert`, `--tls-key`), so tokens never cross a network in clear. Catalog
//! requests list only the project's views. Substrait plans, updates and
//! transactions are refused. Results stream as Arrow record batches.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arrow::datatypes::Schema;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTables, CommandPreparedStatementQuery, CommandStatementQuery,
    CommandStatementSubstraitPlan, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage,
    SchemaAsIpc, Ticket,
};
use base64::Engine;
use futures::{Stream, TryStreamExt};
use prost::Message;
use serde_json::json;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::error::BadInput;
use crate::store::log::AuditLog;
use crate::tre::{self, TreError};

/// The catalog name under which each project's views are listed.
pub const CATALOG: &str = "gpdp";
/// The header that names the project for bearer-token callers.
pub const PROJECT_HEADER: &str = "x-gpdp-project";

/// Standard base64, padded or not (Go's gRPC clients send it unpadded).
const BASE64_ANY_PADDING: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Who is calling, once authenticated.
#[derive(Clone)]
struct Caller {
    user: String,
    token: String,
    project: String,
}

/// A prepared statement: its SQL and the SHA-256 of its owner's identity.
type Prepared = (String, [u8; 32]);

pub struct TreFlightService {
    store: PathBuf,
    tre: Arc<tre::Boundary>,
    /// SHA-256 of a session token → the caller it stands for.
    sessions: Mutex<HashMap<[u8; 32], Caller>>,
    /// Prepared statement handle → the statement and who may use it.
    prepared: Mutex<HashMap<Vec<u8>, Prepared>>,
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn random_token() -> Result<String, Status> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Status::internal("no randomness for a session token"))?;
    Ok(crate::digest::hex(&bytes))
}

/// A TRE error as a Flight status: refusals carry their rule (and
/// construct) and reason; failures while running carry one fixed message;
/// internal errors say only where the operator can look.
fn status(e: TreError) -> Status {
    match e {
        TreError::Refused(r) if r.rule == "authentication" => {
            Status::unauthenticated(r.to_string())
        }
        TreError::Refused(r) => Status::permission_denied(r.to_string()),
        // One fixed message for every failure while running (see tre::EXECUTION_FAILED).
        e @ TreError::Failed(_) => Status::aborted(e.to_string()),
        e @ TreError::Sql(_) => Status::invalid_argument(e.to_string()),
        TreError::Internal(_) | TreError::Store(_) => Status::internal(
            "internal error while running the query (the TRE operator can find it in the audit log)",
        ),
        other => Status::failed_precondition(other.to_string()),
    }
}

impl TreFlightService {
    pub fn new(store: PathBuf, tre: tre::Boundary) -> TreFlightService {
        TreFlightService {
            store,
            tre: Arc::new(tre),
            sessions: Mutex::new(HashMap::new()),
            prepared: Mutex::new(HashMap::new()),
        }
    }

    /// Audits a failed authentication (never the credential itself).
    fn refuse(&self, user: Option<&str>, project: Option<&str>, why: &str) -> Status {
        if crate::store::is_store(&self.store) {
            let entry = json!({
                "event": "connect",
                "time": crate::store::now_rfc3339(),
                "user": user,
                "project": project,
                "outcome": "refused",
                "rule": "authentication",
                "reason": why,
            });
            let _ = AuditLog::at(&self.store).append(&[entry]);
        }
        Status::unauthenticated(format!("refused by rule authentication: {why}"))
    }

    /// The caller of a request: a session token from the handshake, or a
    /// researcher token with the project in a header.
    fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let project = metadata
            .get(PROJECT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let Some(auth) = metadata.get("authorization").and_then(|v| v.to_str().ok()) else {
            return Err(self.refuse(None, project.as_deref(), "no credentials"));
        };
        let Some(token) = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
        else {
            return Err(self.refuse(None, project.as_deref(), "expected a bearer token"));
        };
        let token = token.trim();
        if let Some(c) = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest(token.as_bytes()))
        {
            return Ok(c.clone());
        }
        let Some(user) = tre::auth::researcher_of_token(&self.tre.policy, token) else {
            return Err(self.refuse(None, project.as_deref(), "unknown or wrong token"));
        };
        let Some(project) = project else {
            return Err(self.refuse(
                Some(user),
                None,
                "a researcher token needs the project in the x-gpdp-project header (or use the handshake with user@project)",
            ));
        };
        Ok(Caller {
            user: user.to_owned(),
            token: token.to_owned(),
            project,
        })
    }

    fn request(&self, caller: &Caller, sql: String) -> tre::Request {
        tre::Request {
            store: self.store.clone(),
            user: caller.user.clone(),
            token: Some(caller.token.clone()),
            project: caller.project.clone(),
            sql,
        }
    }

    fn owner(caller: &Caller) -> [u8; 32] {
        digest(format!("{}\0{}\0{}", caller.user, caller.project, caller.token).as_bytes())
    }

    /// A FlightInfo whose ticket carries `command`, for a result of `schema`.
    fn info(
        schema: &Schema,
        command: impl ProstMessageExt,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = Ticket::new(command.as_any().encode_to_vec());
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(format!("encoding a schema: {e}")))?
            .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }

    /// Runs `sql` through the boundary and streams the released result.
    async fn run(
        &self,
        caller: &Caller,
        sql: String,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let released = tre::query(&self.tre, &self.request(caller, sql))
            .await
            .map_err(status)?;
        let batch = released.result.batch;
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(batch.schema())
            .build(futures::stream::once(async move { Ok(batch) }))
            .map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    fn prepared_sql(&self, caller: &Caller, handle: &[u8]) -> Result<String, Status> {
        match self
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(handle)
        {
            Some((sql, owner)) if *owner == Self::owner(caller) => Ok(sql.clone()),
            _ => Err(Status::not_found("no such prepared statement")),
        }
    }

    /// The project's views and their schemas, for catalog requests.
    async fn views(&self, caller: &Caller) -> Result<Vec<(String, Schema)>, Status> {
        let project = tre::auth::authorise(
            &self.tre.policy,
            &caller.user,
            Some(&caller.token),
            &caller.project,
        )
        .map_err(|r| status(TreError::Refused(r)))?;
        let manifest =
            crate::store::read_manifest(&self.store).map_err(|e| status(TreError::Store(e)))?;
        let session = tre::session::open_split(
            &self.store,
            &manifest,
            &self.tre.policy,
            project,
            self.tre.partitions,
        )
        .await
        .map_err(status)?;
        let mut out: Vec<(String, Schema)> = session
            .views
            .iter()
            .map(|(name, plan)| (name.clone(), plan.schema().as_arrow().clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

type HandshakeStream = Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl FlightSqlService for TreFlightService {
    type FlightService = TreFlightService;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<HandshakeStream>, Status> {
        let basic = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| BASE64_ANY_PADDING.decode(b.trim()).ok())
            .and_then(|b| String::from_utf8(b).ok());
        let Some(basic) = basic else {
            return Err(self.refuse(
                None,
                None,
                "the handshake needs Basic credentials (user@project, token)",
            ));
        };
        let Some((login, token)) = basic.split_once(':') else {
            return Err(self.refuse(None, None, "malformed Basic credentials"));
        };
        let Some((user, project)) = login.rsplit_once('@') else {
            return Err(self.refuse(Some(login), None, "the user name must be USER@PROJECT"));
        };
        if let Err(r) = tre::auth::authorise(&self.tre.policy, user, Some(token), project) {
            return Err(if r.rule == "authentication" {
                self.refuse(Some(user), Some(project), "unknown user or wrong token")
            } else {
                status(TreError::Refused(r))
            });
        }
        let session = random_token()?;
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                digest(session.as_bytes()),
                Caller {
                    user: user.to_owned(),
                    token: token.to_owned(),
                    project: project.to_owned(),
                },
            );
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: session.clone().into_bytes().into(),
        };
        let mut response: Response<HandshakeStream> =
            Response::new(Box::pin(futures::stream::iter([Ok(reply)])));
        let header = format!("Bearer {session}")
            .parse()
            .map_err(|_| Status::internal("session token header"))?;
        response.metadata_mut().insert("authorization", header);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = self.caller(request.metadata())?;
        let schema = tre::describe(&self.tre, &self.request(&caller, query.query.clone()))
            .await
            .map_err(status)?;
        let ticket = TicketStatementQuery {
            statement_handle: query.query.into_bytes().into(),
        };
        Self::info(&schema, ticket, request.into_inner())
    }

    async fn get_flight_info_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(request.metadata())?;
        Err(Status::permission_denied(
            "refused by rule substrait_not_supported: send SQL; Substrait plans cannot be checked by the plan guard here",
        ))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = self.caller(request.metadata())?;
        let sql = self.prepared_sql(&caller, &cmd.prepared_statement_handle)?;
        let schema = tre::describe(&self.tre, &self.request(&caller, sql))
            .await
            .map_err(status)?;
        Self::info(&schema, cmd, request.into_inner())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let caller = self.caller(request.metadata())?;
        let sql = String::from_utf8(ticket.statement_handle.to_vec())
            .map_err(|_| Status::invalid_argument("the ticket is not a statement"))?;
        self.run(&caller, sql).await
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let caller = self.caller(request.metadata())?;
        let sql = self.prepared_sql(&caller, &query.prepared_statement_handle)?;
        self.run(&caller, sql).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let caller = self.caller(request.metadata())?;
        let schema = tre::describe(&self.tre, &self.request(&caller, query.query.clone()))
            .await
            .map_err(status)?;
        let IpcMessage(dataset_schema) = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e| Status::internal(format!("encoding a schema: {e}")))?;
        let handle = random_token()?.into_bytes();
        self.prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle.clone(), (query.query, Self::owner(&caller)));
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into(),
            dataset_schema,
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        let caller = self.caller(request.metadata())?;
        let mut prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        if prepared
            .get(query.prepared_statement_handle.as_ref())
            .is_some_and(|(_, owner)| *owner == Self::owner(&caller))
        {
            prepared.remove(query.prepared_statement_handle.as_ref());
        }
        Ok(())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(request.metadata())?;
        let schema = query.into_builder().schema();
        Self::info(&schema, query, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(request.metadata())?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        stream_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(request.metadata())?;
        let schema = query.clone().into_builder().schema();
        Self::info(&schema, query, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let caller = self.caller(request.metadata())?;
        let mut builder = query.into_builder();
        builder.append(CATALOG, &caller.project);
        stream_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(request.metadata())?;
        let schema = query.clone().into_builder().schema();
        Self::info(&schema, query, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let caller = self.caller(request.metadata())?;
        let views = self.views(&caller).await?;
        let mut builder = query.into_builder();
        for (name, schema) in &views {
            builder
                .append(CATALOG, &caller.project, name, "VIEW", schema)
                .map_err(|e| Status::internal(format!("listing views: {e}")))?;
        }
        stream_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(request.metadata())?;
        let schema = query.clone().into_builder(sql_info()?).schema();
        Self::info(&schema, query, request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(request.metadata())?;
        let builder = query.into_builder(sql_info()?);
        stream_batch(builder.schema(), builder.build())
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// What the server tells clients about itself (GetSqlInfo): its name and
/// version, and that it is read-only.
fn sql_info() -> Result<&'static SqlInfoData, Status> {
    static INFO: std::sync::OnceLock<Option<SqlInfoData>> = std::sync::OnceLock::new();
    INFO.get_or_init(|| {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "gpdp TRE");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.build().ok()
    })
    .as_ref()
    .ok_or_else(|| Status::internal("server information"))
}

/// One batch as a Flight data stream.
fn stream_batch(
    schema: arrow::datatypes::SchemaRef,
    batch: Result<arrow::array::RecordBatch, impl std::fmt::Display>,
) -> Result<Response<<TreFlightService as FlightService>::DoGetStream>, Status> {
    let batch = batch.map_err(|e| Status::internal(format!("building a result: {e}")))?;
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::once(async move { Ok(batch) }))
        .map_err(Status::from);
    Ok(Response::new(Box::pin(stream)))
}

/// A certificate chain and private key (PEM) to serve TLS with.
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where the service listens, checked once: loopback, or another address
/// only when remote access is allowed and TLS is configured, because a
/// researcher's token must never cross a network in clear text. [`serve`]
/// takes only this, so no caller can skip the rule.
pub struct Listen {
    addr: SocketAddr,
    tls: Option<Tls>,
}

impl Listen {
    pub fn new(addr: SocketAddr, allow_remote: bool, tls: Option<Tls>) -> Result<Listen, BadInput> {
        if !addr.ip().is_loopback() && (!allow_remote || tls.is_none()) {
            let why = if allow_remote {
                "--allow-remote needs TLS (--tls-cert and --tls-key): tokens must not cross a network in clear text"
            } else {
                "gpdp serve listens on loopback only (127.0.0.1 or ::1); another address needs --allow-remote with TLS (--tls-cert and --tls-key)"
            };
            return Err(BadInput(format!("{addr}: {why}")));
        }
        Ok(Listen { addr, tls })
    }

    /// The URL scheme clients connect with.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "grpc+tls"
        } else {
            "grpc"
        }
    }
}

/// Serves until `shutdown` completes; in-flight requests finish first.
/// `ready` gets the bound address (the port may have been 0).
pub async fn serve(
    store: PathBuf,
    tre: tre::Boundary,
    listen: Listen,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    crate::store::read_manifest(&store)?;
    let Listen { addr: listen, tls } = listen;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| crate::error::BadInput(format!("cannot read {}: {e}", p.display())))
        };
        let identity = tonic::transport::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| crate::error::BadInput(format!("TLS certificate or key: {e}")))?;
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| crate::error::BadInput(format!("cannot listen on {listen}: {e}")))?;
    ready(listener.local_addr()?);
    let service = TreFlightService::new(store, tre);
    server
        .add_service(FlightServiceServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// A client session as a researcher's tool opens one: the Basic handshake
/// with `user@project` and the token, then the session bearer token.
pub async fn connect(
    addr: SocketAddr,
    user: &str,
    project: &str,
    token: &str,
) -> anyhow::Result<arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
    client
        .handshake(&format!("{user}@{project}"), token)
        .await?;
    Ok(client)
}

/// Runs one statement (`GetFlightInfo`, then `DoGet` on every endpoint).
pub async fn fetch(
    client: &mut arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
    sql: &str,
) -> anyhow::Result<Vec<arrow::array::RecordBatch>> {
    let info = client.execute(sql.to_owned(), None).await?;
    let mut out = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint
            .ticket
            .ok_or_else(|| anyhow::anyhow!("an endpoint without a ticket"))?;
        let stream = client.do_get(ticket).await?;
        out.extend(stream.try_collect::<Vec<_>>().await?);
    }
    Ok(out)
}
