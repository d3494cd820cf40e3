//! Prometheus metrics: one registry, typed handles for every place that counts something.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label for an outcome (`accepted`, `duplicate`, `unauthorized`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// The outcome.
    pub result: &'static str,
}

/// Label for an RPC or listener name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    /// The name.
    pub name: &'static str,
}

/// Labels of a call to GitLab.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    /// The call.
    pub call: &'static str,
    /// ok, refused (4xx), error, too_large (answer over kas's limit) or shed (kas's own limits:
    /// GitLab was not asked).
    pub result: &'static str,
}

/// Every metric kas exports.
pub struct Metrics {
    registry: Registry,
    /// Webhook requests by result.
    pub webhooks: Family<ResultLabel, Counter>,
    /// Container registry notification events (and refused envelopes) by result.
    pub registry_events: Family<ResultLabel, Counter>,
    /// GitPushEvent calls by result.
    pub git_push_events: Family<ResultLabel, Counter>,
    /// Seconds from receiving a push to acknowledging it.
    pub intake_seconds: Histogram,
    /// Pushes newly written to the event log.
    pub events_recorded: Counter,
    /// Pushes recognised as redeliveries.
    pub events_duplicate: Counter,
    /// Events handed to the engine.
    pub events_published: Counter,
    /// Failed publication attempts (retried by the outbox).
    pub publish_failures: Counter,
    /// Events pruned by retention.
    pub events_pruned: Counter,
    /// Events received from other replicas through the engine.
    pub events_received_remote: Counter,
    /// Notifications sent to agents.
    pub notifications_sent: Counter,
    /// Pushes folded into a notification already pending.
    pub notifications_coalesced: Counter,
    /// Notifications queued by replay after a reconnect.
    pub notifications_replayed: Counter,
    /// Seconds from receiving a push to sending it to an agent.
    pub intake_to_send_seconds: Histogram,
    /// Open streams by RPC.
    pub streams_open: Family<NameLabel, Gauge>,
    /// Distinct agents with an open stream on this replica.
    pub connected_agents: Gauge,
    /// Rejected credentials by listener.
    pub auth_failures: Family<NameLabel, Counter>,
    /// Engine (Redis) connection failures.
    pub engine_errors: Counter,
    /// Access checks that could not be answered (retried with backoff per project).
    pub access_check_failures: Counter,
    /// Announced sequence numbers the event log does not hold (forged or pruned).
    pub events_unknown_announced: Counter,
    /// Values in Redis that kas did not sign (positions, refusals): someone else wrote them.
    pub engine_forgeries: Counter,
    /// Calls to GitLab by call and result.
    pub gitlab_calls: Family<CallLabel, Counter>,
    /// Entries in the GitLab mode's bounded tables (refusals, peers).
    pub gitlab_cache_entries: Family<NameLabel, Gauge>,
    /// Open connections by listener.
    pub connections_open: Family<NameLabel, Gauge>,
    /// Connections closed at once because their listener was at its cap, by listener.
    pub connections_refused: Family<NameLabel, Counter>,
    /// Connections closed before completing their handshake (timeout or malformed), by listener.
    pub handshakes_failed: Family<NameLabel, Counter>,
    /// Tunnels held on this replica by state (`idle`, `busy`).
    pub tunnels_open: Family<StateLabel, Gauge>,
    /// Calls into clusters through tunnels by outcome.
    pub tunnel_calls: Family<ResultLabel, Counter>,
    /// Seconds a call into a cluster took until its answer's header (or its failure).
    pub tunnel_call_seconds: Histogram,
    /// OCIRepository reconciles requested for image pushes, per agent and event, by outcome.
    pub oci_reconciles: Family<ResultLabel, Counter>,
    /// Seconds from a registry push's receipt to the reconcile request in a cluster.
    pub registry_push_to_patch_seconds: Histogram,
    /// Flux results seen for commit statuses, by what became of them.
    pub sync_statuses: Family<ResultLabel, Counter>,
    /// Seconds from a Git push's receipt to Flux's Ready for that commit, per cluster.
    pub push_to_synced_seconds: Histogram,
}

/// Label for a state (`idle`, `busy`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// The state.
    pub state: &'static str,
}

/// The connection metrics of one listener.
#[derive(Clone, Debug, Default)]
pub struct ListenerMetrics {
    /// Open connections.
    pub open: Gauge,
    /// Connections refused over the cap.
    pub refused: Counter,
    /// Connections that did not complete their handshake.
    pub handshakes_failed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Builds and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kas");
        let latency = || Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let m = Metrics {
            webhooks: Family::default(),
            registry_events: Family::default(),
            git_push_events: Family::default(),
            intake_seconds: latency(),
            events_recorded: Counter::default(),
            events_duplicate: Counter::default(),
            events_published: Counter::default(),
            publish_failures: Counter::default(),
            events_pruned: Counter::default(),
            events_received_remote: Counter::default(),
            notifications_sent: Counter::default(),
            notifications_coalesced: Counter::default(),
            notifications_replayed: Counter::default(),
            intake_to_send_seconds: latency(),
            streams_open: Family::default(),
            connected_agents: Gauge::default(),
            auth_failures: Family::default(),
            engine_errors: Counter::default(),
            events_unknown_announced: Counter::default(),
            access_check_failures: Counter::default(),
            engine_forgeries: Counter::default(),
            gitlab_calls: Family::default(),
            connections_open: Family::default(),
            connections_refused: Family::default(),
            handshakes_failed: Family::default(),
            gitlab_cache_entries: Family::default(),
            tunnels_open: Family::default(),
            tunnel_calls: Family::default(),
            tunnel_call_seconds: latency(),
            oci_reconciles: Family::default(),
            registry_push_to_patch_seconds: latency(),
            sync_statuses: Family::default(),
            // From half a second to about half an hour: Flux's intervals are minutes.
            push_to_synced_seconds: Histogram::new(exponential_buckets(0.5, 2.0, 13)),
            registry: Registry::default(),
        };
        registry.register("webhooks", "Webhook requests by result", m.webhooks.clone());
        registry.register(
            "registry_events",
            "Container registry notification events by result (refused envelopes count once)",
            m.registry_events.clone(),
        );
        registry.register("git_push_events", "GitPushEvent calls by result", m.git_push_events.clone());
        registry.register("intake_seconds", "Time from receiving a push to acknowledging it", m.intake_seconds.clone());
        registry.register("events_recorded", "Pushes written to the event log", m.events_recorded.clone());
        registry.register(
            "events_duplicate",
            "Redelivered pushes acknowledged without a second record",
            m.events_duplicate.clone(),
        );
        registry.register("events_published", "Events handed to the engine", m.events_published.clone());
        registry.register(
            "publish_failures",
            "Failed publication attempts, retried by the outbox",
            m.publish_failures.clone(),
        );
        registry.register("events_pruned", "Events removed by retention", m.events_pruned.clone());
        registry.register(
            "events_received_remote",
            "Events received from other replicas",
            m.events_received_remote.clone(),
        );
        registry.register("notifications_sent", "Notifications sent to agents", m.notifications_sent.clone());
        registry.register(
            "notifications_coalesced",
            "Pushes folded into an already pending notification",
            m.notifications_coalesced.clone(),
        );
        registry.register(
            "notifications_replayed",
            "Notifications queued by replay after a reconnect",
            m.notifications_replayed.clone(),
        );
        registry.register(
            "intake_to_send_seconds",
            "Time from receiving a push to sending it to an agent",
            m.intake_to_send_seconds.clone(),
        );
        registry.register("streams_open", "Open agent streams by RPC", m.streams_open.clone());
        registry.register("connected_agents", "Agents with an open stream on this replica", m.connected_agents.clone());
        registry.register("auth_failures", "Rejected credentials by listener", m.auth_failures.clone());
        registry.register("engine_errors", "Engine (Redis) operation failures", m.engine_errors.clone());
        registry.register(
            "access_check_failures",
            "Access checks the directory could not answer, retried later per project",
            m.access_check_failures.clone(),
        );
        registry.register(
            "events_unknown_announced",
            "Sequence numbers announced on the events channel that the event log does not hold",
            m.events_unknown_announced.clone(),
        );
        registry.register(
            "engine_forgeries",
            "Values found in Redis without kas's signature (ignored)",
            m.engine_forgeries.clone(),
        );
        registry.register("gitlab_calls", "Calls to GitLab by call and result", m.gitlab_calls.clone());
        registry.register("connections_open", "Open connections by listener", m.connections_open.clone());
        registry.register(
            "connections_refused",
            "Connections closed at once because the listener was at its cap",
            m.connections_refused.clone(),
        );
        registry.register(
            "handshakes_failed",
            "Connections closed before completing their handshake (timeout or malformed)",
            m.handshakes_failed.clone(),
        );
        registry.register(
            "gitlab_cache_entries",
            "Entries in GitLab mode's bounded tables: refused tokens, peers presenting unknown tokens",
            m.gitlab_cache_entries.clone(),
        );
        registry.register("tunnels_open", "Agent tunnels held on this replica by state", m.tunnels_open.clone());
        registry.register(
            "tunnel_calls",
            "Calls into agents' clusters through tunnels by outcome (ok, forbidden, http_error, no_tunnel, not_opted_in, timeout, lost, …)",
            m.tunnel_calls.clone(),
        );
        registry.register(
            "tunnel_call_seconds",
            "Time a call into a cluster took until its answer's header or its failure",
            m.tunnel_call_seconds.clone(),
        );
        registry.register(
            "oci_reconciles",
            "OCIRepository reconciles for image pushes, per agent and event, by outcome (ok, no_match, forbidden, not_opted_in, failed; retry when the cluster could not be reached yet)",
            m.oci_reconciles.clone(),
        );
        registry.register(
            "registry_push_to_patch_seconds",
            "Time from a registry push's receipt to kas's reconcile request in an agent's cluster",
            m.registry_push_to_patch_seconds.clone(),
        );
        registry.register(
            "sync_statuses",
            "Flux results for GitLab commit statuses by outcome (posted, already_reported, refused, dropped, not_allowed, unmapped)",
            m.sync_statuses.clone(),
        );
        registry.register(
            "push_to_synced_seconds",
            "Time from kas's receipt of a Git push to Flux's Ready for that commit in an agent's cluster",
            m.push_to_synced_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a registry notification outcome.
    pub fn registry_event(&self, result: &'static str) {
        self.registry_events.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a webhook outcome.
    pub fn webhook(&self, result: &'static str) {
        self.webhooks.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a GitPushEvent outcome.
    pub fn git_push_event(&self, result: &'static str) {
        self.git_push_events.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a rejected credential on a listener.
    pub fn auth_failure(&self, listener: &'static str) {
        self.auth_failures.get_or_create(&NameLabel { name: listener }).inc();
    }

    /// Counts a call to GitLab.
    pub fn gitlab_call(&self, call: &'static str, result: &'static str) {
        self.gitlab_calls.get_or_create(&CallLabel { call, result }).inc();
    }

    /// The size gauge of one of GitLab mode's bounded tables.
    pub fn gitlab_cache(&self, name: &'static str) -> Gauge {
        self.gitlab_cache_entries.get_or_create(&NameLabel { name }).clone()
    }

    /// The open-stream gauge of one RPC.
    pub fn streams(&self, rpc: &'static str) -> Gauge {
        self.streams_open.get_or_create(&NameLabel { name: rpc }).clone()
    }

    /// The gauge of tunnels in `state`.
    pub fn tunnels(&self, state: &'static str) -> Gauge {
        self.tunnels_open.get_or_create(&StateLabel { state }).clone()
    }

    /// Counts an OCIRepository reconcile outcome.
    pub fn oci_reconcile(&self, result: &'static str) {
        self.oci_reconciles.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts what became of a Flux result for a commit status.
    pub fn sync_status(&self, result: &'static str) {
        self.sync_statuses.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a call into a cluster.
    pub fn tunnel_call(&self, result: &'static str) {
        self.tunnel_calls.get_or_create(&ResultLabel { result }).inc();
    }

    /// The connection metrics of one listener.
    pub fn listener(&self, name: &'static str) -> ListenerMetrics {
        let label = NameLabel { name };
        ListenerMetrics {
            open: self.connections_open.get_or_create(&label).clone(),
            refused: self.connections_refused.get_or_create(&label).clone(),
            handshakes_failed: self.handshakes_failed.get_or_create(&label).clone(),
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
