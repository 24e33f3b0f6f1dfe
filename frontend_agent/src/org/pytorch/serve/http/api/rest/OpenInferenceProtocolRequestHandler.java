package org.pytorch.serve.http.api.rest;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import dlrm.agent.OipModels;
import io.netty.channel.ChannelHandlerContext;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.HttpMethod;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.QueryStringDecoder;
import org.pytorch.serve.archive.DownloadArchiveException;
import org.pytorch.serve.archive.model.ModelException;
import org.pytorch.serve.archive.model.ModelNotFoundException;
import org.pytorch.serve.archive.model.ModelVersionNotFoundException;
import org.pytorch.serve.archive.workflow.WorkflowException;
import org.pytorch.serve.http.HttpRequestHandlerChain;
import org.pytorch.serve.util.NettyUtils;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.WorkerInitializationException;

/**
 * The Open Inference Protocol's REST routes other than inference, in place of TorchServe
 * 0.12.0's class of the same name (put in its place by dlrm.agent.FrontendAgent).
 *
 * <p>TorchServe's inference handler takes POST /v2/models/{m}/infer before this link of the
 * chain is reached. Kept from TorchServe: GET /v2/health/live and /v2 (server metadata, with
 * its "extensions" key spelled as the protocol spells it). Changed: GET /v2/health/ready, always
 * true in TorchServe (even while every worker is down and restarting, or with no model at all), is
 * true while at least one model is registered and every model's default version is ready. Added:
 * GET /v2/models/{m}[/versions/{v}] (model metadata) and .../ready (model readiness), answered as
 * the standard gRPC service answers them ({@link OipModels}). Errors have the protocol's
 * {"error": ...} body.
 */
public class OpenInferenceProtocolRequestHandler extends HttpRequestHandlerChain {

    private static final String SERVER_METADATA_API = "/v2";
    private static final String SERVER_LIVE_API = "/v2/health/live";
    private static final String SERVER_READY_API = "/v2/health/ready";

    public OpenInferenceProtocolRequestHandler() {}

    @Override
    public void handleRequest(
            ChannelHandlerContext ctx,
            FullHttpRequest req,
            QueryStringDecoder decoder,
            String[] segments)
            throws ModelException, DownloadArchiveException, WorkflowException,
                    WorkerInitializationException {
        String path = String.join("/", segments).trim();
        if (path.equals(SERVER_READY_API)) {
            boolean ready = OipModels.serverReady();
            JsonObject response = new JsonObject();
            response.addProperty("ready", ready);
            // The protocol answers "not ready" with a 4xx.
            NettyUtils.sendJsonResponse(ctx, response, ready ? HttpResponseStatus.OK : HttpResponseStatus.BAD_REQUEST);
        } else if (path.equals(SERVER_LIVE_API)) {
            JsonObject response = new JsonObject();
            response.addProperty("live", true);
            NettyUtils.sendJsonResponse(ctx, response);
        } else if (path.equals(SERVER_METADATA_API)) {
            JsonObject response = new JsonObject();
            response.addProperty("name", OipModels.SERVER_NAME);
            response.addProperty("version", OipModels.serverVersion());
            JsonArray extensions = new JsonArray();
            OipModels.EXTENSIONS.forEach(extensions::add);
            response.add("extensions", extensions);
            NettyUtils.sendJsonResponse(ctx, response);
        } else if (segments.length >= 4 && "v2".equals(segments[1]) && "models".equals(segments[2])) {
            handleModelRoute(ctx, req, segments);
        } else {
            chain.handleRequest(ctx, req, decoder, segments);
        }
    }

    /** segments: "", "v2", "models", name, ["versions", version], [action]. */
    private void handleModelRoute(ChannelHandlerContext ctx, FullHttpRequest req, String[] segments) {
        String name = segments[3];
        String version = null;
        int next = 4;
        if (segments.length >= 6 && "versions".equals(segments[4])) {
            version = segments[5];
            next = 6;
        }
        String action = segments.length == next ? "" : segments.length == next + 1 ? segments[next] : null;
        if (action == null || !(action.isEmpty() || action.equals("ready"))) {
            if (version != null && ("infer".equals(action) || "explain".equals(action))) {
                sendError(
                        ctx,
                        HttpResponseStatus.NOT_IMPLEMENTED,
                        "inference on a named version is not served: /v2/models/" + name
                                + "/infer serves the default version");
            } else {
                sendError(ctx, HttpResponseStatus.NOT_FOUND, "no such route: " + String.join("/", segments));
            }
            return;
        }
        if (!HttpMethod.GET.equals(req.method())) {
            sendError(ctx, HttpResponseStatus.METHOD_NOT_ALLOWED, req.method() + " is not allowed here: use GET");
            return;
        }
        Model model;
        try {
            model = ModelManager.getInstance().getModel(name, version);
        } catch (ModelVersionNotFoundException e) {
            sendError(ctx, HttpResponseStatus.NOT_FOUND, e.getMessage());
            return;
        }
        if (model == null) {
            sendError(ctx, HttpResponseStatus.NOT_FOUND, "Model not found: " + name);
            return;
        }
        if (action.equals("ready")) {
            sendReadiness(ctx, model);
        } else {
            sendMetadata(ctx, model);
        }
    }

    private static void sendReadiness(ChannelHandlerContext ctx, Model model) {
        if (OipModels.isReady(model)) {
            JsonObject response = new JsonObject();
            response.addProperty("name", model.getModelName());
            response.addProperty("ready", true);
            NettyUtils.sendJsonResponse(ctx, response);
        } else {
            // The protocol answers "not ready" with a 4xx.
            sendError(ctx, HttpResponseStatus.BAD_REQUEST, "model " + model.getModelName() + " is not ready");
        }
    }

    private static void sendMetadata(ChannelHandlerContext ctx, Model model) {
        try {
            NettyUtils.sendJsonResponse(ctx, OipModels.toJson(OipModels.metadata(model)));
        } catch (ModelNotFoundException e) { // unregistered meanwhile
            sendError(ctx, HttpResponseStatus.NOT_FOUND, e.getMessage());
        } catch (OipModels.InvalidMetadataException e) {
            sendError(ctx, HttpResponseStatus.INTERNAL_SERVER_ERROR, e.getMessage());
        }
    }

    private static void sendError(ChannelHandlerContext ctx, HttpResponseStatus status, String message) {
        JsonObject response = new JsonObject();
        response.addProperty("error", message);
        NettyUtils.sendJsonResponse(ctx, response, status);
    }
}
